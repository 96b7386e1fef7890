"""The student-side regularizers and the schedules of their weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Ramp:
    """A value held at ``start`` until step ``begin``, moving linearly to ``end`` over the
    next ``steps`` training steps, then held (``steps = 0``: ``end`` from step ``begin``)."""

    start: float = 1.0
    """Value at step 0."""
    end: float = 1.0
    """Value from step ``begin + steps`` on."""
    steps: int = 0
    """Length of the linear ramp in optimizer steps."""
    begin: int = 0
    """Optimizer step at which the ramp leaves ``start``."""

    def __post_init__(self):
        if self.steps < 0 or self.begin < 0:
            raise ValueError(f"ramp steps and begin must be >= 0, got {self.steps}, {self.begin}")

    def at(self, step: int) -> float:
        if step < self.begin:
            return self.start
        if self.steps == 0 or step >= self.begin + self.steps:
            return self.end
        return self.start + (self.end - self.start) * (step - self.begin) / self.steps


def eikonal_loss(grad_norm: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """mean((|grad sdf| - 1)^2) over samples; ``valid`` (same leading dims, bool) masks
    rays that never entered the field's cube. grad_norm: (B, R, S)."""
    err = (grad_norm - 1.0) ** 2
    if valid is None:
        return err.mean()
    mask = valid[..., None].expand_as(err).to(err.dtype)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """mean(sqrt(opacity^2 + 0.01)): a smooth L1 on the rendered opacity that pushes empty
    space to stay empty (threestudio's sparsity regularizer)."""
    return (opacity.square() + 0.01).sqrt().mean()
