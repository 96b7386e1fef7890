"""Self-describing training checkpoints and exported weights.

Layout of a run folder:
  config.yaml                      the full resolved config of the run
  ckpt/step_00000100/              one DeepSpeed checkpoint (model + optimizer states)
  ckpt/step_00000100/trainer_rank0.pt   step, RNG states, prompt-stream position of rank 0
  ckpt/latest                      the tag of the newest *complete* checkpoint
  export/step_00000100.safetensors trainable weights alone (what ``prd sample`` loads)
  export/latest.safetensors        a copy of the newest export
  metrics.jsonl                    one JSON line per step (``prd.train``)

Kill safety: our per-rank trainer states, then DeepSpeed's files, are written into the
tag folder; only when every rank has finished (a barrier) does rank 0 point
``ckpt/latest`` at the tag, by renaming a temporary file. DeepSpeed's own ``latest`` is
not used: it is written in place, and before the other ranks are done. A kill mid-save
thus leaves ``latest`` on the previous complete checkpoint; the partial tag folder is
overwritten when training reaches that step again. Exports are written to a temporary
name and renamed.
"""

from __future__ import annotations

import json
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
        str(ckpt),
        tag=tag,
        client_state={"step": step},
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    barrier()  # every rank's files are complete
    if rank == 0:
        write_atomic(ckpt / "latest", tag)
    barrier()


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader sees the old or the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / "metrics.jsonl"


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append one step's record (rank 0 only) as a JSON line."""
    with metrics_path(run_dir).open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the lines of steps <= ``step`` (the checkpoint a run resumes from; 0: none)."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return
    # a kill mid-append leaves a last line without its newline: that step is dropped too
    lines = path.read_text().split("\n")[:-1]
    keep = [ln for ln in lines if ln and json.loads(ln)["step"] <= step]
    write_atomic(path, "".join(ln + "\n" for ln in keep))


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-step records of a run, in step order."""
    return [json.loads(ln) for ln in metrics_path(run_dir).read_text().splitlines() if ln]
