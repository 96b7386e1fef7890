"""The ``prd`` command: ``prd train``, ``prd sample``, ``prd params``, ``prd prompts``.

Each subcommand's module adds its own arguments (``add_arguments``) and runs it (``run``).

Errors in what the user gave (a config key, a path, a device: ValueError, which includes
``prd.configio.ConfigError``, and OSError such as FileNotFoundError) print one line
``prd <cmd>: error: <message>`` on stderr and exit with status 2, as argparse does for bad
arguments; ``prd --traceback <cmd> ...`` shows the full traceback instead.
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
    parser.add_argument(
        "--traceback", action="store_true", help="show the traceback of errors in user input"
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


USAGE_ERROR = 2
"""Exit status of a user error (argparse's, for bad arguments)."""


def main(argv: list[str] | None = None) -> int:
    """Run ``prd`` with ``argv`` (default sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as exc:
        if args.traceback:
            raise
        print(f"prd {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
