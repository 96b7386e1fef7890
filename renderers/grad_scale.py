"""``scale_grad``: an identity whose backward multiplies the gradient by a factor.

The renderers and branches use it wherever the reference damps one path of the gradient
without changing the forward pass: the mesh branch's SDF gradients (``mesh.grad_scale``,
0.001 in the reference), the volume branch's colour gradient (``train.volume_color_grad``)
and what colour passes to the NeuS weights (``volume.rgb_geometry_grad``).
"""

from __future__ import annotations

import torch


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged (any shape, dtype, device); its incoming gradient times ``factor``."""
    return _ScaleGrad.apply(x, float(factor))
