"""The triplane field: geometry and texture planes decoded into SDF, colour and deformation.

Plane axes (the same for the geometry and texture triplanes; index 0, 1, 2):
  plane 0 spans (x, y), plane 1 spans (x, z), plane 2 spans (y, z)
with the plane's width axis on the first coordinate and its height axis on the second;
``grid_sample`` coordinates are the world coordinates divided by ``bound`` (corners
aligned), so the planes cover [-bound, bound]^3.

Feature aggregation follows the reference: geometry features are summed over the three
planes (C channels), texture features are concatenated (3C channels). The MLPs have two
hidden layers of 64 and no bias; the SDF is the MLP output plus a sphere of radius 0.5
(DESIGN, "Field decoder"), so a freshly initialized student already renders a closed
surface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PLANE_AXES = ((0, 1), (0, 2), (1, 2))


@dataclass
class FieldConfig:
    """Decoder of triplane features into a field."""

    channels: int = 32
    """Feature channels of one plane (the student's triplane_channels)."""
    hidden: int = 64
    """Width of the two hidden layers of every MLP."""
    bound: float = 1.0
    """The field covers [-bound, bound]^3 (world units)."""
    sphere_radius: float = 0.5
    """Radius of the sphere added to the SDF MLP's output."""

    def __post_init__(self):
        for name in ("channels", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"field.{name} must be >= 1, got {getattr(self, name)}")
        if self.bound <= 0:
            raise ValueError(f"field.bound must be > 0, got {self.bound}")
        if not 0 < self.sphere_radius < self.bound:
            raise ValueError(
                f"field.sphere_radius must lie in (0, bound={self.bound}), got {self.sphere_radius}"
            )


def mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    """Two hidden layers with ReLU, no bias (reference field decoder)."""
    return nn.Sequential(
        nn.Linear(n_in, n_hidden, bias=False),
        nn.ReLU(inplace=True),
        nn.Linear(n_hidden, n_hidden, bias=False),
        nn.ReLU(inplace=True),
        nn.Linear(n_hidden, n_out, bias=False),
    )


def sample_planes(planes: torch.Tensor, points: torch.Tensor, bound: float) -> torch.Tensor:
    """Bilinear features of three axis planes at points.

    planes: (B, 3, C, H, W); points: (B, N, 3) world coordinates.
    Returns (B, 3, N, C): the features of each plane at each point's projection;
    points outside [-bound, bound] read the border (padding_mode="border").
    """
    b, p, c, h, w = planes.shape
    if p != 3:
        raise ValueError(f"expected 3 planes, got planes of shape {tuple(planes.shape)}")
    uv = torch.stack([points[..., list(axes)] for axes in PLANE_AXES], dim=1) / bound  # (B,3,N,2)
    feats = F.grid_sample(
        planes.reshape(b * 3, c, h, w),
        uv.reshape(b * 3, 1, -1, 2).to(planes.dtype),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )  # (B*3, C, 1, N)
    return feats.reshape(b, 3, c, -1).transpose(2, 3)


class FieldDecoder(nn.Module):
    """The trainable MLPs that turn triplane features into SDF, colour and deformation."""

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        self.sdf_mlp = mlp(cfg.channels, cfg.hidden, 1)
        self.color_mlp = mlp(3 * cfg.channels, cfg.hidden, 3)
        self.deform_mlp = mlp(cfg.channels, cfg.hidden, 3)

    def bind(self, geometry: torch.Tensor, texture: torch.Tensor) -> TriplaneField:
        """A field for B objects from their triplanes (B, 3, C, H, W) each."""
        return TriplaneField(self, geometry, texture)


class TriplaneField:
    """B objects' fields: implements ``renderers.field.Field`` on the student's triplanes."""

    def __init__(self, decoder: FieldDecoder, geometry: torch.Tensor, texture: torch.Tensor):
        c = decoder.cfg.channels
        for name, t in (("geometry", geometry), ("texture", texture)):
            if t.ndim != 5 or t.shape[1] != 3 or t.shape[2] != c:
                raise ValueError(f"{name} triplane must be (B, 3, {c}, H, W), got {tuple(t.shape)}")
        self.decoder = decoder
        self.geometry = geometry
        self.texture = texture
        self.bound = decoder.cfg.bound

    def __len__(self) -> int:
        return self.geometry.shape[0]

    def _geo_features(self, points: torch.Tensor) -> torch.Tensor:
        return sample_planes(self.geometry, points, self.bound).sum(dim=1)  # (B,N,C)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N) signed distance at (B, N, 3) points."""
        return self._sdf(self._geo_features(points), points)

    def _sdf(self, feats: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        sphere = points.norm(dim=-1) - self.decoder.cfg.sphere_radius
        return self.decoder.sdf_mlp(feats).squeeze(-1) + sphere

    def color(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) albedo in [0, 1] (sigmoid) at (B, N, 3) points."""
        feats = sample_planes(self.texture, points, self.bound)  # (B,3,N,C)
        feats = feats.permute(0, 2, 1, 3).flatten(2)  # (B,N,3C): planes concatenated
        return torch.sigmoid(self.decoder.color_mlp(feats))

    def deformation(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) raw deformation of marching-cubes grid vertices (the isosurface
        extractor bounds it to a fraction of the grid spacing)."""
        return self.decoder.deform_mlp(self._geo_features(points))

    def sdf_and_deformation(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sdf(points), deformation(points))`` from one sampling of the geometry planes."""
        feats = self._geo_features(points)
        return self._sdf(feats, points), self.decoder.deform_mlp(feats)

    def select(self, index) -> TriplaneField:
        """The field of a subset of objects."""
        return TriplaneField(self.decoder, self.geometry[index], self.texture[index])
