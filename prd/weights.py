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

FORMAT = "prd-weights-1"
# the student's fields of the header keep the name of the student-only format they came from
STUDENT_FORMAT = "prd-trainable-v1"


def student_metadata(student) -> dict[str, str]:
    """The student's fields of a weights file's header (a ``prd.student.PRDStudent``):
    the layout its adapters fit and the base weights they were trained on."""
    cfg = student.cfg
    return {
        "format": STUDENT_FORMAT,
        "arch": cfg.arch,
        "lora_rank": str(cfg.lora_rank),
        "planes": str(cfg.planes),
        "triplane_channels": str(cfg.triplane_channels),
        "base_fingerprint": json.dumps(base_fingerprint(student)),
    }


def base_fingerprint(student) -> list[float]:
    """Mean and std of the first and last frozen tensor of the student's UNet and of its
    VAE decoder.

    Cheap evidence that adapters are loaded onto the base weights they were trained on;
    compared with a relative tolerance so fp16 / bf16 copies of one base still match.
    A module trained whole (``train_base``) has no frozen tensor and contributes nothing:
    its weights are all in the exported file.
    """
    stats = []
    for module in (student.unet, student.decoder):
        frozen = [p for p in module.parameters() if not p.requires_grad]
        for p in frozen[:1] + frozen[-1:]:
            x = p.detach().double()
            stats += [x.mean().item(), x.std().item()]
    return stats


def _check_metadata(meta: dict, want: dict, path, prefix: str = "") -> None:
    """Compare a weights file's header with ``student_metadata`` of a model (keys of the
    header carry ``prefix``); the base fingerprint with a relative tolerance. Raises ValueError
    naming the field."""
    for key in ("format", "arch", "lora_rank", "planes", "triplane_channels"):
        if meta.get(prefix + key) != want[key]:
            got = meta.get(prefix + key)
            raise ValueError(f"{path}: metadata {prefix}{key}={got!r}, model has {want[key]!r}")
    got_fp = json.loads(meta.get(prefix + "base_fingerprint", "[]"))
    want_fp = json.loads(want["base_fingerprint"])
    if len(got_fp) != len(want_fp) or not torch.allclose(
        torch.tensor(got_fp), torch.tensor(want_fp), rtol=1e-2, atol=1e-6
    ):
        raise ValueError(
            f"{path}: adapters were trained on other base weights "
            f"(fingerprint {got_fp} vs model {want_fp})"
        )


def _copy_checked(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path) -> None:
    """Copy ``tensors`` into ``params`` in place after checking that the key sets and the
    shapes agree (KeyError / ValueError naming the keys)."""
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise KeyError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    bad = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(p.shape)}" for k, p in params.items()
           if tensors[k].shape != p.shape]  # fmt: skip
    if bad:
        raise ValueError(f"{path}: shape mismatch (file vs model) {bad}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])


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
    """The full config a weights file was trained with (ValueError naming a file that
    is not a readable safetensors file, e.g. one cut short by a full disk)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
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
    _check_metadata(meta, student_metadata(model.student), path, prefix="student.")
    _copy_checked(trainable_tensors(model), tensors, path)
