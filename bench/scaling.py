"""Data-parallel scaling of ``prd train``: steps/s and prompts/s on 1 and on N ranks.

    python -m bench.scaling [--ranks 1 2] [--steps 6] [--config configs/oracle.yaml] [key=value ...]

Each world size runs the preset for --steps optimizer steps through torchrun (one torch
thread per rank, gloo on CPU), no checkpoint until the end; the step time is the median
of the loop's own per-step "seconds" (metrics.jsonl) after the first 2 steps (start-up,
first-touch allocations). prompts/s = train.batch_size x ranks / step time, and the
speed-up of N ranks over 1 in prompts/s (goal on a 2-core CPU: 2 ranks >= 1.6x).
The oracle preset starts from runs/tiny_base when it exists, else from the same tiny
architecture at random init (the cost of a step does not depend on the weights' values).
Run it on a quiet machine: other processes on the cores change the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from prd import checkpoint
from prd.config import load

WARMUP = 2


def run_world(ranks: int, args, overrides: list[str], folder: Path) -> dict:
    run_dir = folder / f"ranks{ranks}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(ranks), "-m", "prd", "train", "--out", str(run_dir)]
    cmd += [x for c in args.config for x in ("--config", c)] + overrides
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench.scaling: {ranks} ranks failed:\n{done.stderr[-3000:]}")
    seconds = [r["seconds"] for r in checkpoint.read_metrics(run_dir)][WARMUP:]
    step = statistics.median(seconds)
    batch = load(args.config, overrides).train.batch_size
    return {
        "ranks": ranks,
        "step_seconds": round(step, 3),
        "steps_per_s": round(1 / step, 3),
        "prompts_per_s": round(batch * ranks / step, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    args.config = args.config or ["configs/oracle.yaml"]
    if args.steps <= WARMUP:
        p.error(f"--steps must be > {WARMUP} (the first {WARMUP} steps are not timed)")
    overrides = [f"train.steps={args.steps}", f"train.ckpt_every={args.steps}"]
    overrides += ["train.image_every=0", "train.log_every=1"]
    if not Path(load(args.config).student.pretrained or "").is_dir():
        overrides += ["student.pretrained=null"]
    overrides += args.overrides
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_world(r, args, overrides, Path(tmp)) for r in args.ranks]
    base = rows[0]["prompts_per_s"]
    for row in rows:
        row["speedup"] = round(row["prompts_per_s"] / base, 3)
        print(json.dumps(row))
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (numbers are noisy above ~1.5)")


if __name__ == "__main__":
    main()
