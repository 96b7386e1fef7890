"""Self-describing training checkpoints and exported weights.

Layout of a run folder:
  config.yaml                      the full resolved config of the run
  ckpt/step_00000100/              one DeepSpeed checkpoint (model + optimizer states)
  ckpt/step_00000100/trainer_rank0.pt   step, RNG states, prompt-stream position of rank 0
  ckpt/latest                      DeepSpeed's pointer to the newest *complete* checkpoint
  export/step_00000100.safetensors trainable weights alone (what ``prd sample`` loads)
  export/latest.safetensors        a copy of the newest export

Kill safety: DeepSpeed writes ``ckpt/latest`` only after all files of a checkpoint are
written; our per-rank trainer states are written into the tag folder *before* DeepSpeed
saves, so a kill mid-save leaves ``latest`` on the previous complete checkpoint. Exports
are written to a temporary name and renamed.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from prd.distributed import barrier

CKPT_DIR = "ckpt"
EXPORT_DIR = "export"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state(generator: torch.Generator) -> dict:
    """All random states a rank draws from: our generator, torch, numpy, python."""
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_training_state(engine, run_dir: Path, step: int, rank: int, trainer_state: dict) -> None:
    """Save a complete checkpoint of ``step`` (collective: every rank calls it)."""
    ckpt = Path(run_dir) / CKPT_DIR
    tag = tag_for(step)
    (ckpt / tag).mkdir(parents=True, exist_ok=True)
    tmp = ckpt / tag / f"trainer_rank{rank}.pt.tmp"
    torch.save(trainer_state, tmp)
    os.replace(tmp, ckpt / tag / f"trainer_rank{rank}.pt")
    barrier()
    engine.save_checkpoint(
        str(ckpt), tag=tag, client_state={"step": step}, exclude_frozen_parameters=True
    )
    barrier()


def latest_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint of a run, or None."""
    latest = Path(run_dir) / CKPT_DIR / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag.startswith("step_"):
        raise ValueError(f"{latest} names {tag!r}, not a checkpoint written by prd train")
    return int(tag.removeprefix("step_"))


def load_training_state(engine, run_dir: Path, rank: int) -> dict:
    """Restore model and optimizer into ``engine``; returns this rank's trainer state."""
    step = latest_step(run_dir)
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint under {Path(run_dir) / CKPT_DIR}")
    ckpt = Path(run_dir) / CKPT_DIR
    tag = tag_for(step)
    state_file = ckpt / tag / f"trainer_rank{rank}.pt"
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{state_file} is missing: the checkpoint was written by fewer ranks than this run "
            "has; resume with the same world size"
        )
    load_path, _ = engine.load_checkpoint(str(ckpt), tag=tag, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt / tag}")
    # our own file, written by torch.save of plain containers and RNG tensors
    state = torch.load(state_file, weights_only=False)
    if state["step"] != step:
        raise ValueError(f"{state_file} holds step {state['step']}, expected {step}")
    return state


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (rank 0 only)."""
    current = latest_step(run_dir)
    if current is None or keep < 1:
        return
    ckpt = Path(run_dir) / CKPT_DIR
    tags = sorted(p for p in ckpt.glob("step_*") if p.is_dir())
    done = [p for p in tags if int(p.name.removeprefix("step_")) <= current]
    for old in done[:-keep]:
        shutil.rmtree(old)


def export_path(run_dir: Path, step: int | None = None) -> Path:
    name = "latest" if step is None else tag_for(step)
    return Path(run_dir) / EXPORT_DIR / f"{name}.safetensors"
