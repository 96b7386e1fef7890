"""Input roles: how a teacher packs the student's ``Views`` into its model's input.

A role does two things: ``select`` picks the views the teacher sees (one per object, or
all views of each object), and ``encode`` turns views into the model's image tensor
(n, C, size, size) in [-1, 1] at the teacher's resolution (bilinear, antialiased). Latent
teachers then run their VAE encoder on x as is, since SD's VAE takes images in [-1, 1]
(``teachers.sd.vae_encode``); pixel-space teachers (the oracle, RichDreamer ND-MV) use x
as is too. The oracle renders its ground truth and packs it
with the same ``encode``, so student and truth meet in the same space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from teachers.base import Views


def resize(x: Tensor, size: int) -> Tensor:
    """(n, C, h, w) -> (n, C, size, size), bilinear with antialiasing when shrinking."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _select(views: Views, index: Tensor, group: int) -> Views:
    return Views(
        rgb=views.rgb[index],
        mask=views.mask[index],
        depth=views.depth[index],
        normal=views.normal[index],
        cameras=views.cameras.index(index),
        views_per_object=group,
    )


def _rgb_encode(views: Views, size: int) -> Tensor:
    """RGB views -> (n, 3, size, size) in [-1, 1]."""
    return resize(views.rgb.permute(0, 3, 1, 2) * 2 - 1, size)


def _rgb_to_image(x: Tensor) -> Tensor:
    """Model-space (n, C, h, w) -> (n, h, w, 3) in [0, 1] for logging."""
    return ((x.permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1)


@dataclass(frozen=True)
class SingleViewRGB:
    """Stable Diffusion's role: one RGB view per object, in [-1, 1].

    The view is number ``view_offset`` (mod views_per_object) of each object: the reference
    scores view 0 for the mesh branch and the opposite view (offset views_per_object / 2)
    for the volume branch ("sd_oppo_side").
    """

    view_offset: int = 0
    channels: int = 3
    group: int = 1
    """Teacher samples per object that share a timestep (1: every view is independent)."""

    def select(self, views: Views) -> Views:
        v = views.views_per_object
        index = torch.arange(views.n_objects, device=views.rgb.device) * v + self.view_offset % v
        return _select(views, index, 1)

    def encode(self, views: Views, size: int) -> Tensor:
        return _rgb_encode(views, size)

    def to_image(self, x: Tensor) -> Tensor:
        return _rgb_to_image(x)


@dataclass(frozen=True)
class MultiViewRGB:
    """MVDream's role: the n_views RGB views of each object (with their cameras), in [-1, 1]."""

    n_views: int = 4
    channels: int = 3

    @property
    def group(self) -> int:
        return self.n_views

    def select(self, views: Views) -> Views:
        if views.views_per_object != self.n_views:
            raise ValueError(
                f"MultiViewRGB needs {self.n_views} views per object, got {views.views_per_object}"
            )
        return views

    def encode(self, views: Views, size: int) -> Tensor:
        return _rgb_encode(views, size)

    def to_image(self, x: Tensor) -> Tensor:
        return _rgb_to_image(x)


@dataclass(frozen=True)
class MultiViewNormalDepth:
    """RichDreamer ND-MV's role: 4 channels per view (docs/teachers.md, "RichDreamer ND-MV").

    Channels 0-2: the camera-frame normal with x flipped, (-n_x, n_y, n_z), over the
    background (0, 0, 1). Channel 3: depth normalized as (far - d) / (far - near) with
    near / far = distance -+ radius * sqrt(3) (the camera's distance to the origin and
    the object's bounding half-extent), mapped x2 - 1, over the background -1.
    """

    n_views: int = 4
    radius: float = 0.5
    channels: int = 4

    def __post_init__(self):
        if self.radius <= 0:
            raise ValueError(f"radius must be positive, got {self.radius}")

    @property
    def group(self) -> int:
        return self.n_views

    def select(self, views: Views) -> Views:
        if views.views_per_object != self.n_views:
            raise ValueError(
                f"MultiViewNormalDepth needs {self.n_views} views per object, "
                f"got {views.views_per_object}"
            )
        return views

    def encode(self, views: Views, size: int) -> Tensor:
        mask = views.mask[..., None]
        valid = mask > 0  # normals/depth may hold anything (even NaN) off the object
        flip = torch.tensor([-1.0, 1.0, 1.0], dtype=views.normal.dtype, device=views.normal.device)
        normal = torch.where(valid, views.normal * flip, torch.zeros_like(views.normal))
        bg_normal = torch.zeros_like(flip)
        bg_normal[2] = 1.0
        normal = mask * normal + (1 - mask) * bg_normal
        dist = views.cameras.distance.to(views.depth)[:, None, None]
        near = dist - self.radius * math.sqrt(3)
        far = dist + self.radius * math.sqrt(3)
        depth = torch.where(valid[..., 0], views.depth, far)
        d = ((far - depth) / (far - near)) * 2 - 1
        d = mask[..., 0] * d - (1 - mask[..., 0])
        packed = torch.cat([normal, d[..., None]], dim=-1).permute(0, 3, 1, 2)
        return resize(packed, size)

    def to_image(self, x: Tensor) -> Tensor:
        """(n, 4, h, w) -> (n, h, w, 4): normal and depth channels mapped to [0, 1]."""
        return ((x.permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1)


Role = SingleViewRGB | MultiViewRGB | MultiViewNormalDepth
