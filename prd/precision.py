"""Mixed precision of a training run (``train.precision``).

"fp32": everything in fp32, as the reference trains (TriplaneTurbo v1,
``trainer.precision: 32``).

"bf16": the frozen networks are *stored and run* in bf16 — the student's base UNet, its
VAE decoder and text encoder, and the pretrained teachers whose ``dtype`` is "auto" on a
CPU (on CUDA "auto" keeps the reference's fp16 teachers). What trains stays fp32: the
PETA adapters, the new ``conv_out``, the field MLPs and the learned background, their
gradients, and the optimizer's state (DeepSpeed's own bf16 mode is never switched on: it
would cast every parameter of the module, the trainable ones included, to bf16). The
student's forward pass runs under ``torch.autocast`` (matmuls and convolutions in bf16,
reductions and norms as autocast decides); its triplanes leave it as fp32, so the
renderers' coordinates, SDF values, NeuS weights and every loss are fp32.

Why fp32 masters: the adapters' updates are lr x O(1) = 2e-4 of weights of O(1e-2); bf16
keeps 8 significant bits (relative step 2^-8 = 3.9e-3), so most such updates would round
away in bf16 weights.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def frozen_dtype(precision: str) -> torch.dtype:
    """The dtype the frozen networks are stored and run in under ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(precision: str, device: torch.device | str):
    """The context the student's forward pass runs in: bf16 autocast on ``device``'s type
    under "bf16", nothing under "fp32"."""
    if frozen_dtype(precision) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def check_trainable_fp32(module: torch.nn.Module) -> int:
    """Assert every trainable parameter of ``module`` is fp32 (ValueError naming the first
    one that is not); returns their count of elements."""
    count = 0
    for name, p in module.named_parameters():
        if p.requires_grad:
            if p.dtype != torch.float32:
                raise ValueError(f"trainable parameter {name} is {p.dtype}, expected fp32")
            count += p.numel()
    return count
