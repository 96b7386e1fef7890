"""The triplane field: geometry and texture planes decoded into SDF, colour and deformation.

Plane axes of the field (the same for the geometry and texture triplanes; index 0, 1, 2):
  plane 0 spans (x, y), plane 1 spans (x, z), plane 2 spans (y, z)
with the plane's width axis on the first coordinate and its height axis on the second;
``grid_sample`` coordinates are the world coordinates divided by ``bound`` (corners
aligned), so the planes cover [-bound, bound]^3.

``FieldDecoder.bind`` first turns the student's planes into the field's
(``orient_planes``). With the reference's orientation ("v1", TriplaneTurbo's
``rotate_planes``) a generated plane reads as a picture of the object, rows top to bottom
(world: right-handed, +z up):
  xy plane: width along +y, rows along +x (a view from above);
  xz plane: width along -x, rows along -z (a side view, up at the top);
  yz plane: width along +y, rows along -z (a side view, up at the top).
With "fixed", a generated plane is the field's plane as is.

Feature aggregation follows the reference: geometry features are summed over the three
planes (C channels), texture features are concatenated (3C channels). The MLPs have two
hidden layers of 64 and no bias; the SDF is the MLP output plus a sphere of radius 0.5
(docs/reference.md, "Field decoder"), so a freshly initialized student already renders a closed
surface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PLANE_AXES = ((0, 1), (0, 2), (1, 2))
PLANE_ORIENTATIONS = ("v1", "fixed")
COLOR_ACTIVATIONS = ("sigmoid_mipnerf", "sigmoid")
MIPNERF_COLOR_EPS = 0.001
"""MipNeRF's widened sigmoid (Barron et al. 2021), the reference's colour activation."""


def color_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """Albedo from the colour MLP's output: ``sigmoid`` in (0, 1), or ``sigmoid_mipnerf``
    in (-0.001, 1.001), which reaches black and white at finite logits."""
    if name == "sigmoid_mipnerf":
        return torch.sigmoid(x) * (1 + 2 * MIPNERF_COLOR_EPS) - MIPNERF_COLOR_EPS
    if name == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"unknown colour activation {name!r}; expected one of {COLOR_ACTIVATIONS}")


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
    plane_orientation: str = "v1"
    """How generated planes map to world axes (module docstring): "v1" (the reference's,
    each plane upright as SD draws pictures) or "fixed" (the field's axes as generated)."""
    color_activation: str = "sigmoid_mipnerf"
    """Colour MLP output -> albedo: "sigmoid_mipnerf" (the reference's, from MipNeRF:
    sigmoid(x) (1 + 2 eps) - eps with eps = 0.001, so 0 and 1 are reached at finite x) or
    "sigmoid" (range (0, 1))."""

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
        if self.plane_orientation not in PLANE_ORIENTATIONS:
            raise ValueError(
                f"field.plane_orientation must be one of {PLANE_ORIENTATIONS}, "
                f"got {self.plane_orientation!r}"
            )
        if self.color_activation not in COLOR_ACTIVATIONS:
            raise ValueError(
                f"field.color_activation must be one of {COLOR_ACTIVATIONS}, "
                f"got {self.color_activation!r}"
            )


def orient_planes(planes: torch.Tensor, orientation: str) -> torch.Tensor:
    """Generated planes (B, 3, C, H, W) in the order xy, xz, yz -> the field's planes.

    "v1" (the reference's): xy transposed, xz turned 180 degrees, yz flipped top to bottom,
    which samples exactly as the reference's rotated planes at its (x, y), (x, z), (z, y)
    projections (H must equal W); "fixed": unchanged."""
    if orientation == "fixed":
        return planes
    if orientation != "v1":
        raise ValueError(
            f"unknown plane orientation {orientation!r}; expected {PLANE_ORIENTATIONS}"
        )
    if planes.shape[-1] != planes.shape[-2]:
        raise ValueError(f"plane orientation v1 needs square planes, got {tuple(planes.shape)}")
    xy, xz, yz = planes.unbind(dim=1)
    return torch.stack([xy.transpose(-1, -2), xz.flip(-2, -1), yz.flip(-2)], dim=1)


def mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    """Two hidden layers with ReLU, no bias (reference field decoder)."""
    return nn.Sequential(
        nn.Linear(n_in, n_hidden, bias=False),
        nn.ReLU(inplace=True),
        nn.Linear(n_hidden, n_hidden, bias=False),
        nn.ReLU(inplace=True),
        nn.Linear(n_hidden, n_out, bias=False),
    )


def _plane_coords(planes: torch.Tensor, points: torch.Tensor, bound: float) -> torch.Tensor:
    """(B*3, 1, N, 2) grid_sample coordinates of points (B, N, 3) on planes (B, 3, C, H, W)."""
    b, p = planes.shape[:2]
    if planes.ndim != 5 or p != 3:
        raise ValueError(f"expected 3 planes, got planes of shape {tuple(planes.shape)}")
    uv = torch.stack([points[..., list(axes)] for axes in PLANE_AXES], dim=1) / bound  # (B,3,N,2)
    return uv.reshape(b * 3, 1, -1, 2).to(planes.dtype)


def _sample(images: torch.Tensor, grid: torch.Tensor, b: int) -> torch.Tensor:
    """Bilinear, border-padded, corner-aligned samples of (B*3, C, H, W) -> (B, 3, C, N)."""
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(b, 3, images.shape[1], -1)


def sample_planes(planes: torch.Tensor, points: torch.Tensor, bound: float) -> torch.Tensor:
    """Bilinear features of three axis planes at points.

    planes: (B, 3, C, H, W); points: (B, N, 3) world coordinates.
    Returns (B, 3, N, C): the features of each plane at each point's projection;
    points outside [-bound, bound] read the border (padding_mode="border").
    """
    uv = _plane_coords(planes, points, bound)
    b, _, c, h, w = planes.shape
    return _sample(planes.reshape(b * 3, c, h, w), uv, b).transpose(2, 3)


def sample_planes_and_slopes(
    planes: torch.Tensor, points: torch.Tensor, bound: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sample_planes`` plus the features' exact derivatives along each plane's two axes.

    planes: (B, 3, C, H, W); points: (B, N, 3). Returns (value, d_width, d_height), each
    (B, 3, C, N); the derivatives are per world unit and 0 outside [-bound, bound], where
    the border padding makes the features constant.

    Inside texel cell i of the width axis, the bilinear feature changes along that axis by
    the difference plane T[..., i+1] - T[..., i], linearly interpolated along the height
    axis: a ``grid_sample`` of the difference plane with the width coordinate snapped to
    cell i. So the derivatives cost two first-order samplings, where autograd's gradient of
    ``grid_sample`` costs a double backward through its slow composite fallback.
    """
    uv = _plane_coords(planes, points, bound)
    b, _, c, h, w = planes.shape
    t = planes.reshape(b * 3, c, h, w)
    u, v = uv[..., 0], uv[..., 1]

    def cell(x: torch.Tensor, n: int) -> torch.Tensor:
        """x's texel cell along an axis of n texels, as the coordinate of that cell's
        texel on the axis of n - 1 differences."""
        i = ((x + 1.0) * (0.5 * (n - 1))).floor().clamp(0, n - 2)
        return i * (2.0 / (n - 2)) - 1.0 if n > 2 else torch.zeros_like(x)

    def inside(x: torch.Tensor, n: int) -> torch.Tensor:
        return ((x > -1.0) & (x < 1.0)).to(planes.dtype).reshape(b, 3, 1, -1) * (
            (n - 1) / (2 * bound)
        )

    d_width = _sample(t[..., 1:] - t[..., :-1], torch.stack([cell(u, w), v], dim=-1), b)
    d_height = _sample(t[..., 1:, :] - t[..., :-1, :], torch.stack([u, cell(v, h)], dim=-1), b)
    return _sample(t, uv, b), d_width * inside(u, w), d_height * inside(v, h)


def mlp_and_input_gradient(seq: nn.Sequential, x: torch.Tensor):
    """(seq(x), d seq(x) / d x) for a stack of Linear and ReLU layers with one output.

    x: (..., n_in). Returns (..., 1) and (..., n_in). The input gradient is the chain rule
    written out (each ReLU's mask times the transposed weights), so its own gradient needs
    first-order autograd only.
    """
    masks, linears = [], []
    for layer in seq:
        if isinstance(layer, nn.Linear):
            linears.append(layer)
            x = layer(x)
        elif isinstance(layer, nn.ReLU):
            masks.append(x > 0)
            x = torch.relu(x)
        else:
            raise TypeError(f"mlp_and_input_gradient handles Linear and ReLU, not {layer}")
    if x.shape[-1] != 1 or len(masks) != len(linears) - 1:
        raise ValueError("mlp_and_input_gradient needs Linear (ReLU Linear)* with one output")
    grad = linears[-1].weight[0]
    for linear, mask in zip(reversed(linears[:-1]), reversed(masks)):
        grad = (grad * mask) @ linear.weight
    return x, grad


class FieldDecoder(nn.Module):
    """The trainable MLPs that turn triplane features into SDF, colour and deformation."""

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        self.sdf_mlp = mlp(cfg.channels, cfg.hidden, 1)
        self.color_mlp = mlp(3 * cfg.channels, cfg.hidden, 3)
        self.deform_mlp = mlp(cfg.channels, cfg.hidden, 3)

    def bind(self, geometry: torch.Tensor, texture: torch.Tensor) -> TriplaneField:
        """A field for B objects from their generated triplanes (B, 3, C, H, W) each,
        oriented per ``cfg.plane_orientation``."""
        orient = self.cfg.plane_orientation
        return TriplaneField(self, orient_planes(geometry, orient), orient_planes(texture, orient))


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
        return self.decoder.sdf_mlp(feats).squeeze(-1) + self._sphere(points)

    def _sphere(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N) SDF of the sphere the MLP's output is added to."""
        return points.norm(dim=-1) - self.decoder.cfg.sphere_radius

    def sdf_and_gradient(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) signed distance and its (B, N, 3) spatial gradient at points (B, N, 3),
        both differentiable w.r.t. the planes and the MLP with first-order autograd only
        (``renderers.field.sdf_and_normal`` uses this; the points are taken as constants)."""
        value, d_width, d_height = sample_planes_and_slopes(self.geometry, points, self.bound)
        sdf, d_feats = mlp_and_input_gradient(
            self.decoder.sdf_mlp, value.sum(dim=1).transpose(1, 2)
        )
        d_feats = d_feats.transpose(1, 2)[:, None]  # (B, 1, C, N)
        # world axis k gets the slopes of the planes that span it, along the plane axis it is
        slopes = [0.0, 0.0, 0.0]
        for plane, (k_width, k_height) in enumerate(PLANE_AXES):
            slopes[k_width] = slopes[k_width] + d_width[:, plane]
            slopes[k_height] = slopes[k_height] + d_height[:, plane]
        grad = (torch.stack(slopes, dim=1) * d_feats).sum(dim=2).transpose(1, 2)  # (B, N, 3)
        sphere_normal = points / points.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return sdf.squeeze(-1) + self._sphere(points), grad + sphere_normal

    def color(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) albedo at (B, N, 3) points: in [0, 1] up to the activation's margin
        (``FieldConfig.color_activation``)."""
        feats = sample_planes(self.texture, points, self.bound)  # (B,3,N,C)
        feats = feats.permute(0, 2, 1, 3).flatten(2)  # (B,N,3C): planes concatenated
        return color_activation(self.decoder.color_mlp(feats), self.decoder.cfg.color_activation)

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
