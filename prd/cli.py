"""The ``prd`` command: ``prd train``, ``prd sample``, ``prd params``, ``prd prompts``.

Each subcommand's module adds its own arguments (``add_arguments``) and runs it (``run``),
so ``prd --help`` stays fast: heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import sys

from prd import params_cmd, sample, train
from prompts import cli as prompts_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prd",
        description="Progressive Rendering Distillation: text-to-mesh from Stable Diffusion.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, text in (
        ("train", train, "distill a student with its teachers (DeepSpeed)"),
        ("sample", sample, "turn prompts into mesh files with a trained student"),
        ("params", params_cmd, "count trainable and frozen parameters (no weights loaded)"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    p = sub.add_parser("prompts", help="curate prompt sets", description="curate prompt sets")
    prompts_cli.add_commands(p.add_subparsers(dest="prompts_command", required=True))
    p.set_defaults(run=prompts_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
