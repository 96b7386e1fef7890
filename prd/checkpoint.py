"""Self-describing training checkpoints and exported weights.

Layout of a run folder:
  config.yaml                      the full resolved config of the run
  ckpt/step_00000100/              one DeepSpeed checkpoint (model + optimizer states)
  ckpt/step_00000100/trainer_rank0.pt   step, RNG states, prompt-stream position of rank 0
  ckpt/step_00000100/consolidated.pt    fp32 weights + optimizer state by name (prd.reshard)
  ckpt/step_00000100/manifest.json      size and sha256 of every file above, world size
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

A checkpoint is used only if its manifest (written last, by rank 0) matches its files: a
truncated or corrupt ``latest`` (a disk filled up, a copy cut short) is named in the log,
set aside as ``step_N.corrupt`` and the previous complete checkpoint is used; ``keep_ckpts``
(default 2) keeps one to fall back on.

Another world size on resume: DeepSpeed cannot load its ZeRO optimizer partitions on
another data-parallel size, so each save also writes ``consolidated.pt``, a
world-size-independent copy of the trainable state, and such a resume loads it
(``prd.reshard``); a resume on the same world size loads DeepSpeed's own files, bit for
bit. The trainer states of every saved rank then deal the prompt stream and the RNGs
over the new ranks (``restore_position``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from prd import reshard
from prd.distributed import barrier

CKPT_DIR = "ckpt"
EXPORT_DIR = "export"
MANIFEST = "manifest.json"


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
    if rank == 0 and (ckpt / tag).exists():
        # a partial save of this step by a killed run (``latest`` is older): start clean,
        # so no file of another world size stays behind
        shutil.rmtree(ckpt / tag)
    barrier()
    (ckpt / tag).mkdir(parents=True, exist_ok=True)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    tmp = ckpt / tag / f"trainer_rank{rank}.pt.tmp"
    torch.save({**trainer_state, "world_size": world}, tmp)
    os.replace(tmp, ckpt / tag / f"trainer_rank{rank}.pt")
    barrier()
    engine.save_checkpoint(
        str(ckpt),
        tag=tag,
        client_state={"step": step},
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    consolidated = reshard.consolidate(engine)  # collective
    if rank == 0:
        torch.save(consolidated, ckpt / tag / reshard.CONSOLIDATED)
    barrier()  # every rank's files are complete
    if rank == 0:
        write_manifest(ckpt / tag, step, world)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(tag_dir: Path, step: int, world_size: int) -> None:
    """Record size and sha256 of every file of a finished checkpoint (rank 0, last)."""
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    record = {
        "step": step,
        "world_size": world_size,
        "files": {
            str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in files
        },
    }
    write_atomic(tag_dir / MANIFEST, json.dumps(record, indent=1))


def _legacy(tag_dir: Path) -> bool:
    """A checkpoint written before manifests and consolidated copies (trainer files only)."""
    return (
        not (tag_dir / MANIFEST).exists()
        and not (tag_dir / reshard.CONSOLIDATED).exists()
        and (tag_dir / "trainer_rank0.pt").is_file()
    )


def _saved_world_size(tag_dir: Path) -> int:
    if _legacy(tag_dir):
        return len(list(tag_dir.glob("trainer_rank*.pt")))
    return int(json.loads((tag_dir / MANIFEST).read_text())["world_size"])


def checkpoint_problem(tag_dir: Path) -> str | None:
    """What is wrong with a checkpoint folder (a missing, truncated or altered file,
    named), or None when every file matches its manifest."""
    manifest = tag_dir / MANIFEST
    if _legacy(tag_dir):
        return None  # nothing to check it against; ``latest`` moved only once it was whole
    try:
        record = json.loads(manifest.read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest}: missing or unreadable ({exc})"
    for name, want in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path}: {size} bytes, the manifest says {want['bytes']} (truncated?)"
        if _sha256(path) != want["sha256"]:
            return f"{path}: contents differ from the manifest's sha256 (corrupt)"
    return None


def resumable_step(run_dir: Path, log=print) -> int | None:
    """The newest checkpoint step whose files are whole, or None when the run has no
    ``latest`` yet. A damaged ``latest`` (and any damaged older one) is named through
    ``log`` and skipped; ValueError when no checkpoint at all is whole. Read-only."""
    latest = latest_step(run_dir)
    if latest is None:
        return None
    ckpt = Path(run_dir) / CKPT_DIR
    steps = sorted(
        (int(p.name.removeprefix("step_")) for p in ckpt.glob("step_*") if p.name[5:].isdigit()),
        reverse=True,
    )
    problems = []
    for step in [s for s in steps if s <= latest]:
        problem = checkpoint_problem(ckpt / tag_for(step))
        if problem is None:
            if problems:
                log(f"checkpoint of step {latest} is damaged ({problems[0]}); using step {step}")
            return step
        problems.append(problem)
    raise ValueError(
        f"no whole checkpoint in {ckpt} to resume from: " + "; ".join(problems or ["none found"])
    )


def set_aside_damaged(run_dir: Path, good_step: int) -> None:
    """Rename the checkpoints after ``good_step`` up to ``latest`` (whole once, damaged
    since: ``resumable_step`` skipped them) to ``step_N.corrupt`` and point ``latest`` at
    ``good_step`` (rank 0). Nothing damaged is deleted or reused; a folder after ``latest``
    is an interrupted save, replaced when training saves that step again."""
    ckpt = Path(run_dir) / CKPT_DIR
    latest = latest_step(run_dir) or 0
    for p in sorted(ckpt.glob("step_*")):
        if p.name[5:].isdigit() and good_step < int(p.name[5:]) <= latest:
            target, n = p.with_name(p.name + ".corrupt"), 1
            while target.exists():
                target, n = p.with_name(f"{p.name}.corrupt{n}"), n + 1
            os.replace(p, target)
    if latest != good_step:
        write_atomic(ckpt / "latest", tag_for(good_step))


def _load_own(path: Path) -> dict:
    """Our own checkpoint file (torch.save of plain containers and RNG tensors); a damaged
    one raises ValueError naming it."""
    try:
        return torch.load(path, weights_only=False)
    except Exception as exc:  # unpickling raises many types; all mean a damaged file
        raise ValueError(
            f"{path}: not a readable checkpoint file ({type(exc).__name__}: {exc})"
        ) from exc


def load_training_state(engine, run_dir: Path, rank: int, step: int) -> dict:
    """Restore model and optimizer of checkpoint ``step`` into ``engine``; returns this
    rank's trainer state. On another world size than the checkpoint's, the optimizer is
    resharded from ``consolidated.pt`` and the trainer state has ``"resharded_from"``: the
    states of every saved rank (for the prompt stream and the RNGs)."""
    ckpt = Path(run_dir) / CKPT_DIR
    tag = tag_for(step)
    saved_world = _saved_world_size(ckpt / tag)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if saved_world != world and _legacy(ckpt / tag):
        raise ValueError(
            f"{ckpt / tag} was written by {saved_world} ranks before checkpoints carried a "
            f"world-size-independent copy; resume it with {saved_world} ranks"
        )
    if saved_world == world:
        load_path, _ = engine.load_checkpoint(str(ckpt), tag=tag, load_module_strict=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt / tag}")
        state = _load_own(ckpt / tag / f"trainer_rank{rank}.pt")
    else:
        reshard.load_resharded(engine, ckpt, tag, _load_own(ckpt / tag / reshard.CONSOLIDATED))
        states = [_load_own(ckpt / tag / f"trainer_rank{r}.pt") for r in range(saved_world)]
        state = dict(states[min(rank, saved_world - 1)])
        state["resharded_from"] = states
    if state["step"] != step:
        raise ValueError(f"{ckpt / tag}: trainer state holds step {state['step']}, expected {step}")
    return state


def restore_position(state: dict, generator: torch.Generator, stream, rank: int, seed: int) -> None:
    """Put the RNGs and the prompt stream where ``state`` (from ``load_training_state``)
    left them. After a world-size change the stream is dealt from every saved rank's
    position; a rank that did not exist before draws from seeds of (seed, rank, step): no
    other rank's random numbers are replayed."""
    old = state.get("resharded_from")
    if old is None:
        set_rng_state(state["rng"], generator)
        stream.load_state_dict(state["stream"])
        return
    if rank < len(old):
        set_rng_state(old[rank]["rng"], generator)
    else:
        fresh = seed + 1000 * rank + 1_000_003 * state["step"]
        generator.manual_seed(fresh)
        torch.manual_seed(fresh)
        np.random.seed(fresh % 2**32)
        random.seed(fresh)
    stream.load_resharded([s["stream"] for s in old])


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (rank 0 only)."""
    current = latest_step(run_dir)
    if current is None or keep < 1:
        return
    ckpt = Path(run_dir) / CKPT_DIR
    tags = sorted(p for p in ckpt.glob("step_*") if p.is_dir() and p.name[5:].isdigit())
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
