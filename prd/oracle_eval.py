"""Quality of sampled meshes against the oracle's analytic scenes.

Per prompt: Chamfer distance (mean of both directions, world units) between points on
the sampled mesh and on the exact surface, mean vertex-colour error (L2 in RGB) against
the scene's albedo, and silhouette IoU at 4 views (azimuth 0/90/180/270, elevation 15,
distance 1.5) between the rasterized mesh and the sphere-traced scene.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from scipy.spatial import cKDTree

from renderers.cameras import orbit_cameras
from renderers.mesh import render_mesh
from renderers.raster import get_backend
from teachers.scenes import parse_prompt, render_scenes, sample_surface, scene_color


@dataclass
class MeshQuality:
    prompt: str
    chamfer: float
    color_error: float
    silhouette_iou: float

    def as_dict(self) -> dict:
        return asdict(self)


def sample_mesh_points(verts: torch.Tensor, faces: torch.Tensor, n: int, generator=None):
    """n points uniformly by area on a triangle mesh: (n, 3)."""
    tri = verts[faces]  # (F, 3, 3)
    area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1)
    idx = torch.multinomial(area, n, replacement=True, generator=generator)
    u, v = torch.rand(2, n, 1, generator=generator, dtype=verts.dtype)
    flip = (u + v) > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    t = tri[idx]
    return t[:, 0] + u * (t[:, 1] - t[:, 0]) + v * (t[:, 2] - t[:, 0])


def _nearest(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each point of a (N, 3), the distance to the nearest point of b (M, 3) (exact,
    by k-d tree: 20000 x 20000 points in ~0.05 s, against ~3 s for all pairs)."""
    dist, _ = cKDTree(b.double().numpy()).query(a.double().numpy(), k=1)
    return torch.from_numpy(dist).to(a.dtype)


def chamfer_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of the two directed mean nearest-neighbour distances (world units)."""
    return 0.5 * (_nearest(a, b).mean() + _nearest(b, a).mean()).item()


class _UniformColor:
    """A field of one colour (the scene's), to rasterize a mesh's silhouette."""

    bound = 1.0

    def __len__(self) -> int:
        return 1

    def color(self, points):
        return torch.full_like(points, 0.5)


def silhouette_iou(verts, faces, prompt: str, size: int = 64) -> float:
    cams = orbit_cameras([0.0, 90.0, 180.0, 270.0], 15.0, 1.5)
    _, shape = parse_prompt(prompt)
    truth = render_scenes([shape] * 4, scene_color(prompt).expand(4, 3), cams, size)
    out = render_mesh([verts.float()], [faces], _UniformColor(), cams, size, get_backend("torch"))
    pred, gt = out.mask > 0.5, truth.mask > 0.5
    return ((pred & gt).sum() / (pred | gt).sum().clamp_min(1)).item()


def mesh_quality(prompt, verts, faces, colors, n_points: int = 20000, seed: int = 0):
    """MeshQuality of one sampled mesh (verts (V,3), faces (F,3), colors (V,3) in [0,1])."""
    gen = torch.Generator().manual_seed(seed)
    verts, colors = verts.detach().float().cpu(), colors.detach().float().cpu()
    faces = faces.cpu()
    pred = sample_mesh_points(verts, faces, n_points, gen)
    truth, _ = sample_surface(prompt, n_points, gen)
    color_err = (colors - scene_color(prompt)).norm(dim=-1).mean().item()
    return MeshQuality(
        prompt,
        chamfer_distance(pred, truth),
        color_err,
        silhouette_iou(verts, faces, prompt),
    )
