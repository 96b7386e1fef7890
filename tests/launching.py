"""Launching tiny ``prd train`` runs in subprocesses (torchrun, 2 CPU ranks, gloo), shared
by the restart and launcher tests (not a test module itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_train import REPO, TINY

RUN = [*TINY, "train.steps=3", "train.ckpt_every=1", "train.zero_stage=2"]
"""The reference run: 3 steps, a checkpoint every step (keep_ckpts 2, the default)."""


def clean_env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # this process's single-rank group must not leak into a launch
    return env


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


STANDALONE_2 = ("--standalone", "--nproc_per_node", "2")


def run_args(run_dir: Path, *overrides: str) -> list[str]:
    """Config, run folder and overrides of the reference run (what follows ``prd train``)."""
    cfg = ["--config", str(REPO / "configs" / "oracle.yaml"), "--out", str(run_dir)]
    return [*cfg, *RUN, *overrides]


def prd_train(run_dir: Path, *overrides: str) -> list[str]:
    """``prd train --resume auto`` arguments of the reference run into ``run_dir``."""
    return ["train", *run_args(run_dir, *overrides), "--resume", "auto"]


def run(cmd: list[str], env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done
