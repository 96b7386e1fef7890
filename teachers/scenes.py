"""The oracle's analytic scene vocabulary: exact SDFs, sphere tracing, surface samples.

Six shapes x six colours, all centred at the origin, world +z up (issue 3). Every SDF
below is the exact signed distance (negative inside): the solids of revolution (cylinder,
cone, torus, capsule) are evaluated as the 2D signed distance to their cross-section in
the meridian half-plane (rho = |p_xy|, z), which is exact because the nearest surface
point of a point lies in its own meridian half-plane.

Prompts read "a {colour} {shape}" ("a red cube"); an unknown word is a ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from renderers.cameras import Cameras, camera_space, pixel_rays

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "capsule")
COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.6, 0.2, 0.8),
}
_COLOR_NAMES = tuple(COLORS)
# Held out: shape i with colour i (red sphere, green cube, ..., purple capsule).
HELDOUT_PROMPTS = tuple(f"a {c} {s}" for c, s in zip(_COLOR_NAMES, SHAPES))
ALL_PROMPTS = tuple(f"a {c} {s}" for s in SHAPES for c in _COLOR_NAMES)
TRAIN_PROMPTS = tuple(p for p in ALL_PROMPTS if p not in HELDOUT_PROMPTS)

BOUND_RADIUS = 0.55
"""Radius of a sphere around the origin that holds every shape (cube corner: 0.52)."""


def parse_prompt(prompt: str) -> tuple[str, str]:
    """ "a {colour} {shape}" -> (colour, shape); fails naming the unknown word."""
    words = prompt.strip().lower().split()
    if len(words) != 3 or words[0] != "a":
        raise ValueError(f"oracle prompt {prompt!r}: expected 'a {{colour}} {{shape}}'")
    colour, shape = words[1], words[2]
    if colour not in COLORS:
        raise ValueError(
            f"oracle prompt {prompt!r}: unknown colour {colour!r}, not in {_COLOR_NAMES}"
        )
    if shape not in SHAPES:
        raise ValueError(f"oracle prompt {prompt!r}: unknown shape {shape!r}, not in {SHAPES}")
    return colour, shape


def _len(a, b):
    """sqrt(a^2 + b^2), with a finite gradient (0) at the origin unlike torch.hypot."""
    return (a * a + b * b + 1e-30).sqrt()


def _rho(p):
    return _len(p[..., 0], p[..., 1])


def _seg2d(px, pz, ax, az, bx, bz):
    """Distance from 2D points (px, pz) to the segment a-b (scalars a, b)."""
    dx, dz = bx - ax, bz - az
    h = (((px - ax) * dx + (pz - az) * dz) / (dx * dx + dz * dz)).clamp(0.0, 1.0)
    return _len(px - ax - h * dx, pz - az - h * dz)


def _sphere(p):
    return p.norm(dim=-1) - 0.4


def _cube(p):
    q = p.abs() - 0.3
    return (q.clamp(min=0).square().sum(-1) + 1e-30).sqrt() + q.amax(dim=-1).clamp(max=0)


def _cylinder(p):
    dr = _rho(p) - 0.3
    dz = p[..., 2].abs() - 0.35
    outside = _len(dr.clamp(min=0), dz.clamp(min=0))
    return outside + torch.maximum(dr, dz).clamp(max=0)


def _cone(p):
    # Cross-section: the triangle (0,-h), (R,-h), (0,h); its boundary in the half-plane is
    # the base segment and the slant segment (the axis edge is interior to the solid).
    rad, h = 0.35, 0.35
    rho, z = _rho(p), p[..., 2]
    d_base = _seg2d(rho, z, 0.0, -h, rad, -h)
    d_slant = _seg2d(rho, z, rad, -h, 0.0, h)
    inside = (z > -h) & (rho < rad * (h - z) / (2 * h))
    d = torch.minimum(d_base, d_slant)
    return torch.where(inside, -d, d)


def _torus(p):
    return _len(_rho(p) - 0.3, p[..., 2]) - 0.1


def _capsule(p):
    z = p[..., 2].clamp(-0.25, 0.25)
    return _len(_rho(p), p[..., 2] - z) - 0.2


_SDF: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sphere": _sphere,
    "cube": _cube,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "capsule": _capsule,
}


def shape_sdf(shape: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Exact SDF of a vocabulary shape: points (..., 3) -> distances (...)."""
    if shape not in _SDF:
        raise ValueError(f"unknown shape {shape!r}, not in {SHAPES}")
    return _SDF[shape]


def scene_sdf(prompt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Exact SDF of the prompt's scene: world points (..., 3) -> (...), negative inside."""
    return shape_sdf(parse_prompt(prompt)[1])


def scene_color(prompt: str) -> torch.Tensor:
    """(3,) float32 unlit albedo of the prompt's scene, in [0, 1]."""
    return torch.tensor(COLORS[parse_prompt(prompt)[0]])


def sample_surface(prompt: str, n: int, generator: torch.Generator | None = None):
    """n points on the exact surface of the prompt's scene, about uniform by area.

    Uniform points of a thin shell |sdf| < 0.01 are projected along the SDF gradient onto
    the surface (exact for a true SDF); the shell's curvature bias cancels to first order.
    Returns points (n, 3) float32 world units and colors (n, 3) in [0, 1], on the CPU.
    """
    sdf = scene_sdf(prompt)
    shell, kept, total = 0.01, [], 0
    while total < n:
        p = (torch.rand(200_000, 3, generator=generator) * 2 - 1) * BOUND_RADIUS
        p = p[sdf(p).abs() < shell]
        kept.append(p)
        total += p.shape[0]
    p = torch.cat(kept)[:n].double().requires_grad_(True)
    with torch.enable_grad():
        d = sdf(p)
        (g,) = torch.autograd.grad(d.sum(), p)
    points = (p - d[:, None] * torch.nn.functional.normalize(g, dim=-1)).detach().float()
    return points, scene_color(prompt).expand(n, 3).clone()


@dataclass
class SceneRender:
    """Ground-truth renders of B views, images row 0 at the top (renderers.cameras)."""

    rgb: torch.Tensor  # (B, H, W, 3) in [0, 1], over the background colour
    mask: torch.Tensor  # (B, H, W) in {0, 1} (fractional with supersampling)
    depth: torch.Tensor  # (B, H, W) camera z-depth, world units, 0 where mask = 0
    normal: torch.Tensor  # (B, H, W, 3) camera-space unit normals, (0, 0, 1) where mask = 0


def _trace_shape(sdf, origins, dirs, n_steps: int, tol: float, footprint: Tensor):
    """Sphere-trace rays (R, 3) into one shape; returns hit (R,) bool and points (R, 3).

    Rays start where they enter the bounding sphere; every 8 steps the rays that have
    converged (|sdf| < tol / 10) or left the sphere are dropped from the active set. A ray
    is a hit when its final |sdf| < max(tol, footprint * t / 20), a twentieth of its
    pixel's footprint (R,) per unit distance: rays grazing a silhouette converge slowly,
    and this classifies them to a twentieth of a pixel within the step budget.
    """
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - BOUND_RADIUS**2
    disc = b * b - c
    root = disc.clamp(min=0).sqrt()
    t, t_exit = (-b - root).clamp(min=0), -b + root
    active = torch.nonzero(disc > 0).squeeze(1)
    o, d, ta, te = origins[active], dirs[active], t[active], t_exit[active]
    for i in range(n_steps):
        dist = sdf(o + ta[:, None] * d)
        ta = ta + dist
        if i % 8 == 7 or i == n_steps - 1:
            t[active] = ta
            keep = (dist.abs() >= tol * 0.1) & (ta < te)
            active, o, d, ta, te = active[keep], o[keep], d[keep], ta[keep], te[keep]
            if active.numel() == 0:
                break
    pts = origins + t[:, None] * dirs
    thresh = torch.maximum(torch.full_like(t, tol), footprint * t / 20)
    hit = (disc > 0) & (t < t_exit) & (sdf(pts).abs() < thresh)
    return hit, pts


def render_scenes(
    shapes: list[str],
    colors: torch.Tensor,
    cameras: Cameras,
    size: int,
    background=(0.5, 0.5, 0.5),
    supersample: int = 1,
    n_steps: int = 64,
) -> SceneRender:
    """Render shape b with albedo colors[b] (B, 3) from camera b, at size x size pixels.

    Unlit albedo over ``background``; normals are the exact SDF gradients at the hits
    (autograd), rotated into camera space. ``supersample`` s traces s*s rays per pixel and
    box-filters them (antialiased edges). Runs in the cameras' device and dtype.
    """
    if len(shapes) != len(cameras) or colors.shape != (len(cameras), 3):
        raise ValueError(
            f"render_scenes: {len(shapes)} shapes, colors {tuple(colors.shape)} and "
            f"{len(cameras)} cameras must agree"
        )
    res = size * supersample
    origins, dirs = pixel_rays(cameras, res, res)  # (B, res, res, 3)
    n_b = len(cameras)
    footprint = 1.0 / cameras.focal(res)  # pixel size per unit distance along the ray
    dt, dev = origins.dtype, origins.device
    hit = torch.zeros(n_b, res, res, dtype=torch.bool, device=dev)
    normal_w = torch.zeros(n_b, res, res, 3, dtype=dt, device=dev)
    points = torch.zeros(n_b, res, res, 3, dtype=dt, device=dev)
    for shape in set(shapes):
        idx = torch.tensor([i for i, s in enumerate(shapes) if s == shape], device=dev)
        sdf = shape_sdf(shape)
        o, d = origins[idx].reshape(-1, 3), dirs[idx].reshape(-1, 3)
        foot = footprint[idx, None, None].expand(-1, res, res).reshape(-1)
        h, p = _trace_shape(sdf, o, d, n_steps, 1e-4, foot)
        with torch.enable_grad():
            q = p.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(sdf(q).sum(), q)
        hit[idx] = h.reshape(-1, res, res)
        points[idx] = p.reshape(-1, res, res, 3)
        normal_w[idx] = torch.nn.functional.normalize(g, dim=-1).reshape(-1, res, res, 3)
    rot = cameras.c2w[:, :3, :3]
    normal = torch.einsum("bji,bhwj->bhwi", rot, normal_w)  # R^T n: world -> camera
    depth = -camera_space(points.reshape(n_b, -1, 3), cameras)[..., 2].reshape(n_b, res, res)
    mask = hit.to(dt)
    bg = torch.as_tensor(background, dtype=dt, device=dev)
    rgb = mask[..., None] * colors.to(dt)[:, None, None, :] + (1 - mask[..., None]) * bg
    up = torch.tensor([0.0, 0.0, 1.0], dtype=dt, device=dev)
    normal = torch.where(hit[..., None], normal, up)
    depth = torch.where(hit, depth, torch.zeros_like(depth))
    if supersample > 1:
        pool = lambda x: torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), supersample).permute(
            0, 2, 3, 1
        )
        rgb, normal = pool(rgb), pool(normal)
        mask_s = pool(mask[..., None])[..., 0]
        # Depth is averaged over the covered sub-pixels only.
        depth = pool((depth * mask)[..., None])[..., 0] / mask_s.clamp(min=1e-8)
        normal = torch.nn.functional.normalize(normal, dim=-1)
        mask = mask_s
    return SceneRender(rgb=rgb, mask=mask, depth=depth, normal=normal)


class OracleField:
    """The ``renderers.field.Field`` of B oracle scenes (one per prompt), exact SDFs;
    ``scale`` scales every scene about the origin (exact too: s * sdf(p / s))."""

    def __init__(self, prompts: list[str], bound: float = 1.0, scale: float = 1.0):
        if scale <= 0:
            raise ValueError(f"OracleField: scale must be > 0, got {scale}")
        self.shapes = [parse_prompt(p)[1] for p in prompts]
        self.rgb = torch.stack([scene_color(p) for p in prompts])
        self.bound = bound
        self.scale = scale

    def __len__(self) -> int:
        return len(self.shapes)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """points (B, N, 3) -> (B, N)."""
        s = self.scale
        return torch.stack([shape_sdf(n)(p / s) * s for n, p in zip(self.shapes, points)])

    def color(self, points: torch.Tensor) -> torch.Tensor:
        """points (B, N, 3) -> (B, N, 3) constant albedo per object."""
        return self.rgb.to(points)[:, None, :].expand(points.shape[0], points.shape[1], 3)

    def deformation(self, points: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(points)
