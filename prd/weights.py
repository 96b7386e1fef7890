"""Exported weights of a run: the trainable tensors alone (PETA adapters, the new VAE
conv_out, the field MLPs) in one safetensors file, with a metadata header that ties them
to their base model. ``prd sample --ckpt RUN`` loads ``RUN/export/latest.safetensors``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from prd import checkpoint
from prd.configio import to_yaml
from prd.student import _metadata as student_metadata
from prd.student import check_metadata, copy_checked

FORMAT = "prd-weights-1"


def trainable_tensors(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def metadata(model, cfg) -> dict[str, str]:
    meta = {f"student.{k}": v for k, v in student_metadata(model.student).items()}
    meta.update(
        format=FORMAT,
        field=json.dumps([model.decoder.cfg.channels, model.decoder.cfg.hidden]),
        config=to_yaml(cfg),
    )
    return meta


def _gathered(params):
    """Context giving full tensors of ZeRO-3-partitioned parameters (no-op otherwise)."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save_weights(model, cfg, run_dir: Path, step: int, is_main: bool = True) -> Path:
    """Write export/step_N.safetensors and refresh export/latest.safetensors atomically.

    Collective under ZeRO-3 (every rank must call it); only rank 0 writes.
    """
    params = trainable_tensors(model)
    path = checkpoint.export_path(run_dir, step)
    with _gathered(list(params.values())):
        tensors = {n: p.detach().float().cpu().contiguous() for n, p in params.items()}
    if not is_main:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata(model, cfg))
    os.replace(tmp, path)
    latest = checkpoint.export_path(run_dir)
    shutil.copyfile(path, latest.with_suffix(".tmp"))
    os.replace(latest.with_suffix(".tmp"), latest)
    return path


def read_config_yaml(path: Path) -> str:
    """The full config a weights file was trained with."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a PRD weights file (format {meta.get('format')!r})")
    return meta["config"]


def load_weights(model, path: str | Path) -> None:
    """Load an exported weights file into ``model`` in place.

    Fails, naming what differs, on another format, student arch / rank / planes / channels,
    field size, base-weight fingerprint, missing or unexpected keys, or shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    expected = {
        "format": FORMAT,
        "field": json.dumps([model.decoder.cfg.channels, model.decoder.cfg.hidden]),
    }
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ValueError(f"{path}: metadata {key}={meta.get(key)!r}, the model has {value!r}")
    check_metadata(meta, student_metadata(model.student), path, prefix="student.")
    copy_checked(trainable_tensors(model), tensors, path)
