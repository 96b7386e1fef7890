"""Mesh scores against the analytic scenes: known answers on spheres, a naive reference."""

import pytest
import torch
import trimesh

from prd.oracle_eval import _nearest, chamfer_distance, mesh_quality, sample_mesh_points


def _sphere(radius: float):
    m = trimesh.creation.icosphere(subdivisions=5, radius=radius)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)


def test_nearest_equals_all_pairs():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(700, 3, generator=g), torch.rand(900, 3, generator=g)
    want = torch.cdist(a.double(), b.double()).amin(dim=1).float()
    assert torch.allclose(_nearest(a, b), want, atol=1e-6)


def test_concentric_spheres_are_their_radius_gap_apart():
    v, f = _sphere(0.5)
    g = torch.Generator().manual_seed(0)
    outer = sample_mesh_points(v, f, 20000, g)
    assert outer.norm(dim=-1).sub(0.5).abs().max() < 2e-3  # on the (fine) mesh
    inner = sample_mesh_points(*_sphere(0.4), 20000, g)
    assert chamfer_distance(outer, inner) == pytest.approx(0.1, abs=3e-3)


def test_exact_sphere_scores_near_perfect():
    v, f = _sphere(0.4)  # "a red sphere": radius 0.4, colour (0.9, 0.1, 0.1)
    colors = torch.tensor([0.9, 0.1, 0.1]).expand(len(v), 3)
    q = mesh_quality("a red sphere", v, f, colors)
    assert q.chamfer < 0.01 and q.color_error < 1e-6 and q.silhouette_iou > 0.95
    q_blue = mesh_quality("a red sphere", v, f, torch.tensor([0.1, 0.2, 0.9]).expand(len(v), 3))
    assert q_blue.color_error == pytest.approx(((0.8**2) + 0.1**2 + 0.8**2) ** 0.5, rel=1e-5)
