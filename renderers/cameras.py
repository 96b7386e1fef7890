"""Cameras: the one convention every renderer and teacher of PRD uses.

Convention (OpenGL, as threestudio and the reference code):
- World frame: right-handed, **+z up**; objects are centred at the origin.
- A camera on the sphere of radius ``distance`` sits at
  ``distance * (cos(el) cos(az), cos(el) sin(az), sin(el))`` (azimuth from +x towards +y,
  elevation above the xy plane) and looks at the origin with world +z as its up hint.
- ``c2w`` is the OpenGL camera-to-world matrix: its columns are the camera's right (+x),
  up (+y) and backward (+z) axes in world coordinates, and its position. The camera looks
  along its -z axis.
- Images are (B, H, W, C) with **row 0 at the top**; pixel (row i, column j) has its centre
  at image coordinates (x, y) = (j + 0.5, i + 0.5). Its ray direction in camera space is
  ``((x - W/2) / f, -(y - H/2) / f, -1)`` with ``f = (H/2) / tan(fov_y/2)`` (square pixels).
- Clip space is OpenGL's (``projection_matrix``): x right, y up, depth in [-1, 1] from near
  to far. A rasterizer in nvdiffrast's convention returns row 0 at the *bottom*; renderers
  flip it to the top-row-first image convention above.

Converters to other conventions (MVDream's and RichDreamer's camera encodings) live with
the teachers that need them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CameraSampling:
    """Distribution of training cameras (docs/reference.md: 4 views, 90 degrees apart,
    random offset)."""

    n_views: int = 4
    """Views per object; their azimuths are evenly spaced (360/n_views apart)."""
    elevation_range: tuple[float, float] = (0.0, 30.0)
    """Elevation in degrees, sampled uniformly per object."""
    distance_range: tuple[float, float] = (1.39, 1.73)
    """Camera distance to the origin, sampled uniformly per object."""
    fov_y: float = 60.0
    """Vertical field of view in degrees."""

    def __post_init__(self):
        if self.n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {self.n_views}")
        lo, hi = self.elevation_range
        if not -90.0 < lo <= hi < 90.0:
            raise ValueError(f"elevation_range must lie in (-90, 90) degrees, got {lo, hi}")
        lo, hi = self.distance_range
        if not 0.0 < lo <= hi:
            raise ValueError(f"distance_range must be positive and ordered, got {lo, hi}")
        if not 0.0 < self.fov_y < 180.0:
            raise ValueError(f"fov_y must lie in (0, 180) degrees, got {self.fov_y}")


@dataclass
class Cameras:
    """A batch of B pinhole cameras; tensors share one device and dtype.

    ``azimuth``, ``elevation``, ``distance`` are kept beside ``c2w`` because the
    multi-view teachers encode cameras from them; for cameras built by ``orbit_cameras``
    they are exactly the spherical coordinates of the camera centre.
    """

    c2w: torch.Tensor  # (B, 4, 4) OpenGL camera-to-world
    fov_y: torch.Tensor  # (B,) degrees
    azimuth: torch.Tensor  # (B,) degrees
    elevation: torch.Tensor  # (B,) degrees
    distance: torch.Tensor  # (B,) world units

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def position(self) -> torch.Tensor:
        """(B, 3) camera centres in world coordinates."""
        return self.c2w[:, :3, 3]

    def focal(self, height: int) -> torch.Tensor:
        """(B,) focal length in pixels for an image of the given height."""
        return 0.5 * height / torch.tan(torch.deg2rad(self.fov_y) / 2)

    def w2c(self) -> torch.Tensor:
        """(B, 4, 4) world-to-camera matrices (rigid inverse of c2w)."""
        rot = self.c2w[:, :3, :3]
        t = self.c2w[:, :3, 3:]
        out = torch.zeros_like(self.c2w)
        out[:, :3, :3] = rot.transpose(1, 2)
        out[:, :3, 3:] = -rot.transpose(1, 2) @ t
        out[:, 3, 3] = 1.0
        return out

    def index(self, idx) -> Cameras:
        """Select cameras by an index or slice along the batch dimension."""
        pick = lambda t: t[idx]
        return Cameras(
            pick(self.c2w),
            pick(self.fov_y),
            pick(self.azimuth),
            pick(self.elevation),
            pick(self.distance),
        )

    @staticmethod
    def cat(batches: list[Cameras]) -> Cameras:
        """Concatenate camera batches along the batch dimension."""
        names = ("c2w", "fov_y", "azimuth", "elevation", "distance")
        return Cameras(*(torch.cat([getattr(c, n) for c in batches]) for n in names))

    def to(self, device=None, dtype=None) -> Cameras:
        conv = lambda t: t.to(device=device, dtype=dtype)
        return Cameras(
            conv(self.c2w),
            conv(self.fov_y),
            conv(self.azimuth),
            conv(self.elevation),
            conv(self.distance),
        )


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up=(0.0, 0.0, 1.0)):
    """OpenGL camera-to-world matrices of cameras at ``eye`` looking at ``target``.

    eye: (B, 3); target: (B, 3) or None for the origin; up: world up hint (default +z).
    Returns (B, 4, 4). Fails if a camera looks straight along the up hint.
    """
    if target is None:
        target = torch.zeros_like(eye)
    up_t = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    backward = torch.nn.functional.normalize(eye - target, dim=-1)
    right = torch.linalg.cross(up_t, backward, dim=-1)
    norm = right.norm(dim=-1, keepdim=True)
    if bool((norm < 1e-8).any()):
        raise ValueError("look_at: a camera looks along the up hint; its roll is undefined")
    right = right / norm
    cam_up = torch.linalg.cross(backward, right, dim=-1)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = cam_up
    c2w[:, :3, 2] = backward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w


def orbit_cameras(azimuth, elevation, distance, fov_y=60.0, device=None, dtype=torch.float32):
    """Cameras on a sphere around the origin, looking at it.

    azimuth, elevation (degrees), distance, fov_y (degrees): scalars or (B,) tensors,
    broadcast together. Returns ``Cameras`` with B = the broadcast length.
    """
    as_t = lambda v: torch.as_tensor(v, dtype=dtype, device=device).reshape(-1)
    az, el, dist, fov = torch.broadcast_tensors(
        as_t(azimuth), as_t(elevation), as_t(distance), as_t(fov_y)
    )
    az_r, el_r = torch.deg2rad(az), torch.deg2rad(el)
    eye = torch.stack(
        [
            dist * torch.cos(el_r) * torch.cos(az_r),
            dist * torch.cos(el_r) * torch.sin(az_r),
            dist * torch.sin(el_r),
        ],
        dim=-1,
    )
    return Cameras(look_at(eye), fov.clone(), az.clone(), el.clone(), dist.clone())


def sample_cameras(
    n_objects: int,
    sampling: CameraSampling,
    generator: torch.Generator | None = None,
    device=None,
    dtype=torch.float32,
) -> Cameras:
    """Training cameras: ``n_objects * n_views`` cameras, views of one object contiguous.

    Per object: one random azimuth offset in [0, 360), views evenly spaced from it; one
    elevation and one distance drawn uniformly from the configured ranges (docs/reference.md, after
    the reference's multi-view camera sampler). Random numbers come from ``generator`` on
    the CPU so that results do not depend on the device.
    """
    v = sampling.n_views
    u = torch.rand(n_objects, 3, generator=generator, dtype=torch.float64)
    offset = u[:, 0] * 360.0
    el_lo, el_hi = sampling.elevation_range
    d_lo, d_hi = sampling.distance_range
    elevation = el_lo + (el_hi - el_lo) * u[:, 1]
    distance = d_lo + (d_hi - d_lo) * u[:, 2]
    steps = torch.arange(v, dtype=torch.float64) * (360.0 / v)
    azimuth = (offset[:, None] + steps[None, :]) % 360.0
    return orbit_cameras(
        azimuth.reshape(-1),
        elevation.repeat_interleave(v),
        distance.repeat_interleave(v),
        sampling.fov_y,
        device=device,
        dtype=dtype,
    )


def pixel_rays(cameras: Cameras, height: int, width: int, rows=None, cols=None):
    """World-space rays through pixel centres.

    By default all H x W pixels; ``rows`` (h,) and ``cols`` (w,) may pick a sub-grid (for
    patch rendering): they are float pixel indices of the full H x W image, so a coarse
    grid of the full image is ``rows = (torch.arange(h) + 0.5) * H / h - 0.5``.
    Returns origins and unit directions, each (B, h, w, 3) in the cameras' dtype.
    """
    dev, dt = cameras.device, cameras.c2w.dtype
    if rows is None:
        rows = torch.arange(height, device=dev, dtype=dt)
    if cols is None:
        cols = torch.arange(width, device=dev, dtype=dt)
    rows = torch.as_tensor(rows, device=dev, dtype=dt)
    cols = torch.as_tensor(cols, device=dev, dtype=dt)
    f = cameras.focal(height)[:, None, None]  # (B,1,1)
    x = (cols[None, None, :] + 0.5 - width / 2) / f  # (B,1,w)
    y = -(rows[None, :, None] + 0.5 - height / 2) / f  # (B,h,1)
    x, y = torch.broadcast_tensors(x, y)
    d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (B,h,w,3)
    rot = cameras.c2w[:, :3, :3]
    d_world = torch.einsum("bij,bhwj->bhwi", rot, d_cam)
    d_world = torch.nn.functional.normalize(d_world, dim=-1)
    origins = cameras.position[:, None, None, :].expand_as(d_world)
    return origins, d_world


def projection_matrix(fov_y, near: float, far: float, aspect: float = 1.0) -> torch.Tensor:
    """OpenGL perspective projection, (B, 4, 4), for (B,) vertical fov in degrees."""
    fov_y = torch.as_tensor(fov_y).reshape(-1)
    t = torch.tan(torch.deg2rad(fov_y) / 2)
    p = torch.zeros(fov_y.shape[0], 4, 4, dtype=fov_y.dtype, device=fov_y.device)
    p[:, 0, 0] = 1.0 / (aspect * t)
    p[:, 1, 1] = 1.0 / t
    p[:, 2, 2] = -(far + near) / (far - near)
    p[:, 2, 3] = -2.0 * far * near / (far - near)
    p[:, 3, 2] = -1.0
    return p


def world_to_clip(cameras: Cameras, near: float = 0.1, far: float = 4.0) -> torch.Tensor:
    """(B, 4, 4) matrices taking homogeneous world points to OpenGL clip space."""
    return projection_matrix(cameras.fov_y, near, far) @ cameras.w2c()


def camera_space(points: torch.Tensor, cameras: Cameras) -> torch.Tensor:
    """Transform (B, N, 3) world *points* into each camera's frame: x right, y up, z
    backward (visible points have z < 0). Directions and normals take the rotation alone:
    ``dirs @ cameras.w2c()[:, :3, :3].transpose(1, 2)``."""
    w2c = cameras.w2c()
    return points @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]


def fov_for_extent(extent: float, distance: float) -> float:
    """Vertical fov (degrees) that frames a half-extent ``extent`` at ``distance``."""
    return math.degrees(2 * math.atan(extent / distance))
