"""Benchmark prompt curation and streaming on a synthetic corpus with planted duplicates.

    python -m bench.prompts                 # 1.7M lines (the paper's prompt count)
    python -m bench.prompts --lines 100000  # quicker

Prints: curation wall time, peak resident memory, exact and near-duplicate recall and
precision against the planted labels, and streaming throughput (prompts/s) of
`PromptStream` for 1 rank and for each of 2 ranks. Goal on a 2-core machine: 1.7M lines
in under 10 minutes within 8 GiB.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.rss import peak_rss_gib
from prompts.config import CurateConfig
from prompts.curate import curate, load_manifest
from prompts.stream import PromptStream

STYLES = ["", ", 8k", ", trending on artstation", " --ar 16:9", ", highly detailed, 4k"]


def synthesize(path: Path, n_lines: int, seed: int = 0) -> dict[str, set[str]]:
    """Write n_lines prompts: ~76% originals, 8% exact copies (case / punctuation / style
    tail changed), 12% near copies (a word added or dropped at an end: Jaccard of word
    3-shingles >= 0.85), 4% junk. Returns the planted exact and near copies' texts."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ra", "tu", "ve", "zo", "ni", "pe", "sa", "do", "gu", "fi", "be"]
    vocab = sorted({"".join(rng.choices(syll, k=rng.randint(2, 4))) for _ in range(60000)})
    recent: list[list[str]] = []
    planted: dict[str, set[str]] = {"exact": set(), "near": set()}
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_lines):
            u = rng.random()
            if u < 0.04:
                f.write(rng.choice(["", "!!!", "12 34 56", "ok"]) + "\n")
            elif u < 0.12 and recent:
                words = rng.choice(recent)
                text = " ".join(words)
                text = text.capitalize() + "." if rng.random() < 0.5 else text
                f.write(text + rng.choice(STYLES) + "\n")
                planted["exact"].add(" ".join(words))
            elif u < 0.24 and recent:
                words = list(rng.choice(recent))
                r = rng.random()
                if r < 0.5:
                    words.append(rng.choice(vocab))
                elif r < 0.75:
                    words = words[1:]
                else:
                    words = words[:-1]
                f.write(" ".join(words) + "\n")
                planted["near"].add(" ".join(words))
            else:
                words = ["a", *rng.choices(vocab, k=rng.randint(10, 18))]
                f.write(" ".join(words) + rng.choice(STYLES) + "\n")
                if len(recent) < 5000:
                    recent.append(words)
                else:
                    recent[rng.randrange(5000)] = words
    return planted


def stream_rate(folder: Path, rank: int, world: int, n: int) -> float:
    s = PromptStream(folder, 256, rank=rank, world_size=world, seed=0)
    s.next_batch()  # the first batch imports `datasets`: not part of the steady rate
    start = time.perf_counter()
    got = 0
    while got < n:
        got += len(s.next_batch())
    return got / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_700_000)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--stream-prompts", type=int, default=200_000, help="per measurement")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        planted = synthesize(tmp / "corpus.txt", args.lines)
        size = (tmp / "corpus.txt").stat().st_size / 2**20
        took = time.perf_counter() - start
        print(f"synthesized {args.lines} lines ({size:.0f} MiB) in {took:.1f} s")

        start = time.perf_counter()
        report = curate([tmp / "corpus.txt"], tmp / "out", CurateConfig(shards=args.shards))
        wall = time.perf_counter() - start
        peak = peak_rss_gib()
        c = report["counts"]
        print(
            f"curated in {wall:.1f} s ({args.lines / wall:,.0f} lines/s), peak RSS {peak:.2f} GiB"
        )
        print(f"kept {report['kept']['train']}; removed per rule: {c}")

        kept: set[str] = set()
        for shard in load_manifest(tmp / "out")["splits"]["train"]["shards"]:
            kept.update(pq.read_table(tmp / "out" / shard["file"]).column("prompt").to_pylist())
        near_removed = sum(t not in kept for t in planted["near"])
        print(
            f"near duplicates: planted {len(planted['near'])}, removed {near_removed} "
            f"(recall {near_removed / max(len(planted['near']), 1):.4f}); "
            f"rule count {c['near_duplicate']} (precision "
            f"{near_removed / max(c['near_duplicate'], 1):.4f})"
        )
        print(
            f"exact copies: {c['exact_duplicate']} removed; every original kept once: "
            f"{all(t in kept for t in planted['exact'])}"
        )

        n = min(args.stream_prompts, report["kept"]["train"])
        print(f"stream, 1 rank: {stream_rate(tmp / 'out', 0, 1, n):,.0f} prompts/s")
        for r in range(2):
            rate = stream_rate(tmp / "out", r, 2, n // 2)
            print(f"stream, rank {r} of 2: {rate:,.0f} prompts/s")


if __name__ == "__main__":
    main()
