"""The ``prd`` command: ``prd train``, ``prd sample``, ``prd eval``, ``prd params``,
``prd tiny-base``, ``prd convert``, ``prd prompts``.

Each subcommand's module adds its own arguments (``add_arguments``) and runs it (``run``).
Only the module of the command being run is imported (torch and diffusers take seconds
to import), so ``prd --help`` answers at once.

Errors in what the user gave (a config key, a path, a device: ValueError, which includes
``prd.configio.ConfigError``, and OSError such as FileNotFoundError) print one line
``prd <cmd>: error: <message>`` on stderr and exit with status 2, as argparse does for bad
arguments; ``prd --traceback <cmd> ...`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import sys


def _train():
    from prd import train

    return train


def _sample():
    from prd import sample

    return sample


def _tiny_base():
    from prd import tiny_base

    return tiny_base


def _convert():
    from prd import convert

    return convert


def _eval():
    from prd import eval_cmd

    return eval_cmd


def _params():
    from prd import params_cmd

    return params_cmd


COMMANDS = (
    ("train", "distill a student with its teachers (DeepSpeed)", _train),
    ("sample", "turn prompts into mesh files with a trained student", _sample),
    ("eval", "score meshes of a prompt set: CLIP score, R@1 (the paper's protocol)", _eval),
    ("params", "count trainable and frozen parameters (no weights loaded)", _params),
    ("tiny-base", "pretrain the tiny SD in code (the embedded default's base)", _tiny_base),
    ("convert", "original MVDream / ND-MV checkpoint -> diffusers folder", _convert),
)
"""(name, help, module loader): each module has add_arguments(parser) and run(args)."""

USAGE_ERROR = 2
"""Exit status of a user error (argparse's, for bad arguments)."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of subcommand ``command`` only (all when None)."""
    parser = argparse.ArgumentParser(
        prog="prd",
        description="Progressive Rendering Distillation: text-to-mesh from Stable Diffusion.",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the traceback of errors in user input"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text, loader in COMMANDS:
        p = sub.add_parser(name, help=text, description=text)
        if command in (None, name):
            module = loader()
            module.add_arguments(p)
            p.set_defaults(run=module.run)
    p = sub.add_parser("prompts", help="curate prompt sets", description="curate prompt sets")
    if command in (None, "prompts"):
        from prompts import cli as prompts_cli

        prompts_cli.add_commands(p.add_subparsers(dest="prompts_command", required=True))
        p.set_defaults(run=prompts_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``prd`` with ``argv`` (default sys.argv[1:]); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as exc:
        if args.traceback:
            raise
        print(f"prd {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
