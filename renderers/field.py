"""The field interface the renderers draw: a batch of B objects, queried at points.

``prd.triplane.TriplaneField`` implements it for the student's triplanes; analytic
fields (a sphere in the tests, the oracle scenes) implement it too, so every renderer can
be checked against a closed form.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Field(Protocol):
    """B objects' signed distance, colour and grid deformation, at world points.

    points: (B, N, 3) world coordinates, in the field's dtype and device; point set n of
    object b is evaluated with object b's features. All outputs are differentiable with
    respect to the points and the field's parameters.
    """

    bound: float
    """The field is defined on the cube [-bound, bound]^3."""

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N) signed distance, negative inside."""
        ...

    def color(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) unlit albedo in [0, 1]."""
        ...

    def deformation(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) raw offsets of the marching-cubes grid vertices; the isosurface
        extractor bounds them to half a grid spacing (``renderers.isosurface``)."""
        ...


def sdf_and_normal(field: Field, points: torch.Tensor, create_graph: bool = True):
    """SDF and its spatial gradient at points (B, N, 3).

    Returns sdf (B, N) and grad (B, N, 3) (not normalized: the eikonal loss needs its
    norm). With ``create_graph`` the gradient is itself differentiable (training); points
    need not require grad. A field with a ``sdf_and_gradient(points)`` method (the
    triplane field: a closed form with first-order autograd only) gives both when the
    points are constants; otherwise autograd differentiates ``field.sdf``.
    """
    closed_form = getattr(field, "sdf_and_gradient", None)
    if closed_form is not None and not points.requires_grad:
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            sdf, grad = closed_form(points)
        return sdf, (grad if create_graph else grad.detach())
    # Keep the SDF's graph when the caller will backpropagate through it.
    keep = create_graph or torch.is_grad_enabled()
    with torch.enable_grad():
        pts = points if points.requires_grad else points.detach().requires_grad_(True)
        sdf = field.sdf(pts)
        (grad,) = torch.autograd.grad(sdf.sum(), pts, create_graph=create_graph, retain_graph=keep)
    return sdf, grad


class SphereField:
    """A coloured sphere per object: the closed-form field of the renderer tests.

    radius: (B,) or float; color: (B, 3) or a 3-sequence; offsets in deformation are 0.
    """

    def __init__(self, radius, color=(0.8, 0.3, 0.2), center=(0.0, 0.0, 0.0), bound=1.0):
        # a tensor radius is kept as given (dtype, autograd), e.g. a learnable one
        self.radius = radius if torch.is_tensor(radius) else torch.tensor(radius)
        self.center = torch.as_tensor(center, dtype=torch.float32)
        self.rgb = torch.as_tensor(color, dtype=torch.float32)
        self.bound = bound

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        r = self.radius.to(points).reshape(-1, 1) if self.radius.ndim else self.radius.to(points)
        return (points - self.center.to(points)).norm(dim=-1) - r

    def color(self, points: torch.Tensor) -> torch.Tensor:
        rgb = self.rgb.to(points)
        rgb = rgb[:, None, :] if rgb.ndim == 2 else rgb[None, None, :]
        return rgb.expand(points.shape[0], points.shape[1], 3)

    def deformation(self, points: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(points)
