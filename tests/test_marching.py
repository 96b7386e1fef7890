"""Marching cubes in torch (renderers.marching): the case table, closed and outward
surfaces, the edge set against a naive reference, and agreement with the library path."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from renderers.field import SphereField
from renderers.isosurface import extract_surface, marching_cubes, surface_edges
from renderers.marching import CORNERS, EDGES, build_case_table, marching_cubes_torch


def _coords(res: int) -> torch.Tensor:
    axis = torch.linspace(-1.0, 1.0, res, dtype=torch.float64)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)


def _blobs(res: int, seed: int) -> torch.Tensor:
    """A smooth random SDF-like grid, positive on the border (a closed surface)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 1, 7, 7, 7, generator=g, dtype=torch.float64)
    sdf = F.interpolate(coarse, size=(res,) * 3, mode="trilinear", align_corners=True)[0, 0]
    sdf[[0, -1]] = sdf[:, [0, -1]] = sdf[:, :, [0, -1]] = 1.0
    return sdf


def _naive_edges(sdf: torch.Tensor) -> set[tuple[int, int]]:
    """Every grid edge whose ends are on opposite sides (inside: SDF < 0), by loops."""
    s = sdf.numpy()
    r = s.shape[0]
    out = set()
    for i, j, k in np.ndindex(s.shape):
        a = (i * r + j) * r + k
        for d, (di, dj, dk) in enumerate(((1, 0, 0), (0, 1, 0), (0, 0, 1))):
            n = (i + di, j + dj, k + dk)
            if max(n) < r and (s[i, j, k] < 0) != (s[n] < 0):
                out.add((a, a + (r * r, r, 1)[d]))
    return out


def _positions(sdf: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    flat, pts = sdf.reshape(-1), _coords(sdf.shape[0]).reshape(-1, 3)
    s_a, s_b = flat[edges[:, 0]], flat[edges[:, 1]]
    t = s_a / (s_a - s_b)
    return pts[edges[:, 0]] + t[:, None] * (pts[edges[:, 1]] - pts[edges[:, 0]])


def _signed_volume(verts: torch.Tensor, faces: torch.Tensor) -> float:
    p, q, r = verts[faces].unbind(1)
    return float((p * torch.cross(q, r, dim=1)).sum() / 6)


def _assert_closed_and_oriented(faces: torch.Tensor):
    directed = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    assert len(torch.unique(directed, dim=0)) == len(directed)  # consistently wound
    _, uses = torch.unique(directed.sort(1).values, dim=0, return_counts=True)
    assert (uses == 2).all()  # every edge between exactly two faces: no holes


def test_case_table_uses_exactly_the_crossing_edges():
    table, counts = build_case_table()
    assert table.shape[0] == 256 and counts[0] == 0 and counts[255] == 0
    for case in range(256):
        inside = [case >> c & 1 for c in range(8)]
        crossing = {e for e, (a, b) in enumerate(EDGES) if inside[a] != inside[b]}
        used = table[case, : counts[case]].reshape(-1).tolist()
        assert set(used) == crossing, case
        assert (table[case, counts[case] :] == -1).all()
    # one inside corner: one triangle; each of the 12 edges lies along one axis
    assert all(counts[1 << c] == 1 for c in range(8))
    for a, b in EDGES:
        assert sum(x != y for x, y in zip(CORNERS[a], CORNERS[b])) == 1


def test_sphere_closed_outward_and_its_volume():
    res, radius = 40, 0.6
    sdf = _coords(res).norm(dim=-1) - radius
    edges, faces = marching_cubes_torch(sdf)
    assert set(map(tuple, edges.tolist())) == _naive_edges(sdf)
    _assert_closed_and_oriented(faces)
    volume = _signed_volume(_positions(sdf, edges), faces)
    # positive: normals point out (to positive SDF); a chordal surface is a little inside
    assert volume == pytest.approx(4 / 3 * math.pi * radius**3, rel=1e-2)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_surface_matches_the_library(seed):
    sdf = _blobs(36, seed)
    edges, faces = marching_cubes_torch(sdf)
    assert set(map(tuple, edges.tolist())) == _naive_edges(sdf)
    _assert_closed_and_oriented(faces)
    # the library's surface on the same grid: the same vertices; the triangles differ only
    # where a face is ambiguous or a cell's polygon is split along another diagonal
    lib_edges, lib_faces = surface_edges(*marching_cubes(sdf.numpy()), sdf.numpy())
    lib_edges, lib_faces = torch.from_numpy(lib_edges), torch.from_numpy(lib_faces)
    lib_volume = _signed_volume(_positions(sdf, lib_edges), lib_faces)
    assert _signed_volume(_positions(sdf, edges), faces) == pytest.approx(lib_volume, rel=1e-3)
    assert abs(len(faces) - len(lib_faces)) <= 0.002 * len(faces)


def test_surface_through_grid_points():
    # a plane exactly on the grid points i = 3: SDF 0 counts as outside, so each vertex
    # sits on a point (t = 1) of an axis-0 edge and the 7 x 7 cells give 98 triangles
    r = 8
    sdf = (torch.arange(r, dtype=torch.float64) - 3.0)[:, None, None].expand(r, r, r)
    edges, faces = marching_cubes_torch(sdf.contiguous())
    assert len(edges) == r * r and len(faces) == 2 * (r - 1) ** 2
    idx = torch.arange(r**3).reshape(r, r, r)
    assert torch.equal(edges[:, 1], idx[3].reshape(-1)) and torch.equal(
        edges[:, 0], idx[2].reshape(-1)
    )
    verts = _positions(sdf, edges)
    p, q, rr = verts[faces].unbind(1)
    normals = torch.cross(q - p, rr - p, dim=1)
    assert (normals[:, 0] > 0).all()  # towards increasing SDF
    assert float(normals.norm(dim=1).sum() / 2) == pytest.approx(4.0)  # the 2 x 2 plane


def test_no_sign_change_and_bad_shape():
    edges, faces = marching_cubes_torch(torch.ones(5, 5, 5))
    assert edges.shape == (0, 2) and faces.shape == (0, 3)
    with pytest.raises(ValueError, match=r"\(R, R, R\) grid, got \(5, 5, 4\)"):
        marching_cubes_torch(torch.ones(5, 5, 4))


def test_extract_surface_methods_agree():
    field = SphereField(0.55, center=(0.05, -0.03, 0.02))
    meshes = {
        m: extract_surface(field, 24, n_objects=1, dtype=torch.float64, method=m)[0]
        for m in ("skimage", "torch")
    }
    order = {
        m: torch.argsort(mesh.edges[:, 0] * 24**3 + mesh.edges[:, 1]) for m, mesh in meshes.items()
    }
    lib, ours = (meshes[m].verts[order[m]] for m in ("skimage", "torch"))
    assert torch.allclose(lib, ours, atol=1e-12)
    assert torch.equal(
        meshes["skimage"].edges[order["skimage"]], meshes["torch"].edges[order["torch"]]
    )
    with pytest.raises(ValueError, match="isosurface method must be one of"):
        extract_surface(field, 8, n_objects=1, method="mcubes")


def test_config_names_a_bad_method():
    from prd.config import SampleConfig
    from renderers.mesh import MeshRenderConfig

    assert SampleConfig().isosurface == "torch" and MeshRenderConfig().isosurface == "skimage"
    with pytest.raises(ValueError, match="sample.isosurface must be one of"):
        SampleConfig(isosurface="mcubes")
    with pytest.raises(ValueError, match="mesh.isosurface must be one of"):
        MeshRenderConfig(isosurface="diffmc")
