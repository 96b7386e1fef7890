"""Command line of the prompt tools: `prd prompts curate ...` and `prd prompts sources`.

The main `prd` command mounts these with `add_commands(subparsers)` and calls `run(args)`;
`python -m prompts.cli ...` runs them alone.
"""

from __future__ import annotations

import argparse
import sys
import time

from prompts.clean import DEFAULT_BOILERPLATE
from prompts.config import CurateConfig

SOURCES = """\
Where to get prompt sets (download them yourself, check each licence; nothing is fetched):

  DF415       the 415 evaluation prompts of DreamFusion / ATT3D-style evaluations, as used by
              the paper for CLIP score and R@1. Published with DreamFusion's project page
              (dreamfusion3d.github.io, gallery prompts); use it with --eval to keep it held out.
  3DTopia     ~361k Objaverse object captions released with 3DTopia
              (github.com/3DTopia/3DTopia, Hugging Face dataset "hongfz16/3DTopia").
  Cap3D       ~1M+ automatic captions of Objaverse / ABO / ShapeNet objects
              (Hugging Face dataset "tiange/Cap3D", file Cap3D_automated_Objaverse*.csv).
  DiffusionDB 2M / 14M Stable Diffusion user prompts with their images
              (Hugging Face dataset "poloclub/diffusiondb", metadata.parquet, column "prompt").

Then:  prd prompts curate FILE... --out DIR [--eval DF415.txt] [--val-fraction 0.01]
"""


def add_commands(subparsers) -> None:
    """Register `curate` and `sources` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "curate", help="clean, filter, dedup, split and shard prompt files into a folder"
    )
    p.set_defaults(prompts_command="curate")
    p.add_argument("inputs", nargs="+", help=".txt .jsonl .csv .tsv .parquet .json (+ .gz)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--eval", nargs="*", default=[], help="evaluation prompt files to hold out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    d = CurateConfig()
    p.add_argument("--field", default=None, help="JSON key / column of the prompt")
    p.add_argument("--min-chars", type=int, default=d.min_chars)
    p.add_argument("--min-words", type=int, default=d.min_words)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--too-long", choices=("truncate", "drop"), default=d.too_long)
    p.add_argument("--min-letter-fraction", type=float, default=d.min_letter_fraction)
    p.add_argument(
        "--min-latin-fraction", type=float, default=None, help="script check (off by default)"
    )
    p.add_argument("--blocklist", default=None, help="file of blocked words, one a line")
    p.add_argument(
        "--boilerplate",
        default=None,
        help="file of comma segments to strip, one a line (default: a built-in list of "
        f"{len(DEFAULT_BOILERPLATE)} such as '8k', 'trending on artstation')",
    )
    p.add_argument("--keep-syntax", action="store_true", help="keep --ar / (word:1.3) syntax")
    p.add_argument("--no-near-dedup", action="store_true", help="exact dedup only")
    p.add_argument("--threshold", type=float, default=d.threshold, help="near-dup Jaccard")
    p.add_argument("--shingle-size", type=int, default=d.shingle_size)
    p.add_argument("--num-perm", type=int, default=d.num_perm)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--shards", type=int, default=d.shards)
    p.add_argument("--val-shards", type=int, default=d.val_shards)
    p.add_argument("--examples", type=int, default=d.examples, help="examples per rule")
    p.add_argument("--tokenizer-cache", default=None)

    s = subparsers.add_parser("sources", help="where to get DF415, 3DTopia, Cap3D, DiffusionDB")
    s.set_defaults(prompts_command="sources")


def config_from_args(args: argparse.Namespace) -> CurateConfig:
    boilerplate = DEFAULT_BOILERPLATE
    if args.boilerplate is not None:
        with open(args.boilerplate, encoding="utf-8") as f:
            boilerplate = tuple(ln.strip().lower() for ln in f if ln.strip())
    return CurateConfig(
        field=args.field,
        min_chars=args.min_chars,
        min_words=args.min_words,
        max_tokens=args.max_tokens,
        too_long=args.too_long,
        min_letter_fraction=args.min_letter_fraction,
        min_latin_fraction=args.min_latin_fraction,
        blocklist=args.blocklist,
        boilerplate=boilerplate,
        strip_syntax=not args.keep_syntax,
        near_dedup=not args.no_near_dedup,
        threshold=args.threshold,
        shingle_size=args.shingle_size,
        num_perm=args.num_perm,
        val_fraction=args.val_fraction,
        shards=args.shards,
        val_shards=args.val_shards,
        examples=args.examples,
        tokenizer_cache=args.tokenizer_cache,
    )


def run(args: argparse.Namespace) -> int:
    """Run the command chosen by `add_commands`' parsers; returns the exit code."""
    command = getattr(args, "prompts_command", None)
    if command == "sources":
        print(SOURCES, end="")
        return 0
    if command == "curate":
        from prompts.curate import curate
        from prompts.report import format_report

        start = time.perf_counter()
        report = curate(
            args.inputs, args.out, config_from_args(args), args.eval, overwrite=args.overwrite
        )
        print(format_report(report), end="")
        print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
        return 0
    raise ValueError(f"no prompts command chosen (got {command!r}); use curate or sources")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prompts", description=__doc__.splitlines()[0])
    add_commands(parser.add_subparsers(required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
