"""Differentiable marching cubes: geometry of an analytic sphere, orientation, gradients."""

import numpy as np
import pytest
import torch
import trimesh

from renderers.field import SphereField
from renderers.isosurface import (
    evaluate_grid,
    extract_surface,
    grid_points,
    grid_spacing,
    marching_cubes,
    surface_edges,
)

CENTER = (0.07, -0.04, 0.03)


def _trimesh(mesh):
    return trimesh.Trimesh(mesh.verts.detach().numpy(), mesh.faces.numpy(), process=False)


class GridField:
    """SDF and raw deformation given at the grid points by tensors (nearest grid point)."""

    def __init__(self, values: torch.Tensor, deform: torch.Tensor, bound: float = 1.0):
        self.values, self.deform, self.bound = values, deform, bound  # (R,R,R), (R,R,R,3)

    def _index(self, points):
        r = self.values.shape[0]
        ijk = torch.round((points + self.bound) / grid_spacing(self.bound, r)).long()
        return ijk.unbind(-1)

    def sdf(self, points):
        return self.values[self._index(points)]

    def deformation(self, points):
        return self.deform[self._index(points)]


class ShiftedSphere(SphereField):
    """A sphere whose marching-cubes grid carries one learnable raw deformation (3,)."""

    def __init__(self, radius, raw, **kw):
        super().__init__(radius, **kw)
        self.raw = raw

    def deformation(self, points):
        return self.raw.to(points).expand_as(points)


@pytest.mark.parametrize("res", [40, 33])
def test_sphere_vertices_faces_outward_and_closed(res):
    radius = 0.5 if res == 33 else 0.6  # res 33, centred: 6 grid points have SDF exactly 0
    center = (0.0, 0.0, 0.0) if res == 33 else CENTER
    field = SphereField(radius, center=center)
    (mesh,) = extract_surface(field, res, n_objects=1, dtype=torch.float64)
    h = grid_spacing(1.0, res)
    rel = mesh.verts.detach() - torch.tensor(center, dtype=torch.float64)
    # Linear interpolation of a sphere errs by ~h^2 / (8 r): far below half a voxel.
    assert (rel.norm(dim=1) - radius).abs().max() < 0.03 * h
    v = mesh.verts.detach()[mesh.faces]
    normal = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    outward = (normal * (v.mean(dim=1) - torch.tensor(center, dtype=torch.float64))).sum(-1)
    assert (outward > 0).all()
    tm = _trimesh(mesh)
    assert tm.is_watertight
    assert len(np.unique(tm.vertices, axis=0)) == len(tm.vertices)  # grid-point copies merged
    assert tm.volume == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.02)
    assert not mesh.empty and mesh.faces.dtype == torch.int64


def test_vertices_match_library_and_grad_paths_agree():
    field = SphereField(0.6, center=CENTER)
    res = 24
    sdf, _ = evaluate_grid(field, res, n_objects=1, dtype=torch.float64)
    lib_verts, _ = marching_cubes(sdf[0].numpy())
    lib_world = lib_verts * grid_spacing(1.0, res) - 1.0
    (m_grad,) = extract_surface(field, res, n_objects=1, dtype=torch.float64)
    (m_nograd,) = extract_surface(field, res, n_objects=1, dtype=torch.float64, with_grad=False)
    # Same vertex set as the library (whose positions are float32), in some order.
    ours = np.sort(m_grad.verts.detach().numpy().view("f8,f8,f8"), axis=0).view("f8")
    ref = np.sort(lib_world.view("f8,f8,f8"), axis=0).view("f8")
    np.testing.assert_allclose(ours.reshape(-1, 3), ref.reshape(-1, 3), atol=1e-5)
    assert m_grad.verts.requires_grad is False  # a SphereField with a constant radius
    torch.testing.assert_close(m_grad.verts, m_nograd.verts)
    assert torch.equal(m_grad.faces, m_nograd.faces)


def test_evaluate_grid_chunks_and_closed_form():
    field = SphereField(torch.tensor([0.5, 0.3]), center=CENTER)
    sdf, deform = evaluate_grid(field, 9, n_objects=2, chunk=7)
    sdf_one, _ = evaluate_grid(field, 9, n_objects=2, deformation=False)
    assert sdf.shape == (2, 9, 9, 9) and deform.shape == (2, 9, 9, 9, 3)
    assert torch.equal(sdf, sdf_one)
    pts = grid_points(torch.arange(9**3), 9, 1.0)
    expect = (pts - torch.tensor(CENTER)).norm(dim=-1)[None] - torch.tensor([[0.5], [0.3]])
    torch.testing.assert_close(sdf.reshape(2, -1), expect)
    assert grid_points(torch.tensor([0, 9**3 - 1]), 9, 1.0).tolist() == [[-1.0] * 3, [1.0] * 3]


def test_radius_gradient_matches_finite_difference():
    def sphere(r):
        field = SphereField(0.0, center=CENTER)
        field.radius = r  # float64, and keeps the graph (the constructor copies to float32)
        return field

    radius = torch.tensor(0.55, dtype=torch.float64, requires_grad=True)
    (mesh,) = extract_surface(sphere(radius), 20, n_objects=1, dtype=torch.float64)
    mesh.verts.norm(dim=1).sum().backward()

    def loss(r):
        r = torch.tensor(r, dtype=torch.float64)
        (m,) = extract_surface(sphere(r), 20, n_objects=1, with_grad=False, dtype=torch.float64)
        return m.verts.norm(dim=1).sum().item(), len(m.verts)

    eps = 1e-5
    (lp, n_p), (lm, n_m) = loss(0.55 + eps), loss(0.55 - eps)
    assert n_p == n_m == len(mesh.verts)  # same topology
    assert radius.grad.item() == pytest.approx((lp - lm) / (2 * eps), rel=1e-6)
    # Every vertex moves outwards about one-for-one with the radius.
    assert radius.grad.item() == pytest.approx(len(mesh.verts), rel=0.05)


def test_deformation_gradient_analytic():
    raw = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    res = 16
    field = ShiftedSphere(0.5, raw, center=CENTER)
    (mesh,) = extract_surface(field, res, n_objects=1, dtype=torch.float64)
    (plain,) = extract_surface(SphereField(0.5, center=CENTER), res, n_objects=1,
                               dtype=torch.float64)  # fmt: skip
    half = 0.5 * grid_spacing(1.0, res)
    shift = half * torch.tanh(raw.detach())
    torch.testing.assert_close(mesh.verts.detach(), plain.verts + shift)
    (mesh.verts * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    expect = len(mesh.verts) * half * (1 - torch.tanh(raw.detach()) ** 2) * torch.tensor([1, 2, 3])
    torch.testing.assert_close(raw.grad, expect.to(torch.float64))
    # The no-grad path takes the same deformation, from the grid or from the field.
    grid = evaluate_grid(field, res, n_objects=1, dtype=torch.float64)
    (m_grid,) = extract_surface(field, res, n_objects=1, grid=grid, with_grad=False)
    torch.testing.assert_close(m_grid.verts, mesh.verts.detach())


def test_gradcheck_grid_values_and_deformation():
    res = 6
    gen = torch.Generator().manual_seed(0)
    pts = grid_points(torch.arange(res**3), res, 1.0, torch.float64).reshape(res, res, res, 3)
    values = pts.norm(dim=-1) - 0.7 + 0.1 * torch.rand(res, res, res, generator=gen)
    values = values.to(torch.float64)
    assert values.abs().min() > 1e-4  # finite differences keep the topology
    deform = 0.5 * torch.randn(res, res, res, 3, generator=gen, dtype=torch.float64)

    def verts(v, d):
        (m,) = extract_surface(GridField(v, d), res, n_objects=1, dtype=torch.float64)
        return m.verts

    inputs = (values.requires_grad_(True), deform.requires_grad_(True))
    assert torch.autograd.gradcheck(verts, inputs, eps=1e-6, atol=1e-6)


def test_empty_surfaces_do_not_raise():
    # Object 0: inside everywhere; object 1: a sphere between grid points; object 2: real.
    field = SphereField(torch.tensor([5.0, 0.01, 0.5]))
    meshes = extract_surface(field, 8, n_objects=3)
    assert [m.empty for m in meshes] == [True, True, False]
    assert meshes[0].verts.shape == (0, 3) and meshes[0].faces.shape == (0, 3)
    assert [m.object_index for m in meshes] == [0, 1, 2]
    (only,) = extract_surface(field, 8, n_objects=3, objects=[2], with_grad=False)
    torch.testing.assert_close(only.verts, meshes[2].verts)
    assert only.object_index == 2


def test_bad_inputs_raise():
    field = SphereField(0.5)
    sdf, _ = evaluate_grid(field, 6, n_objects=1)
    sdf[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        extract_surface(field, 6, n_objects=1, grid=(sdf, None))
    with pytest.raises(ValueError, match="out of range"):
        extract_surface(field, 6, n_objects=1, objects=[1])
    with pytest.raises(ValueError, match="grid sdf must be"):
        extract_surface(field, 7, n_objects=1, grid=(sdf, None))


def test_surface_edges_rejects_vertices_off_grid_edges():
    sdf = np.ones((4, 4, 4))
    sdf[1, 2, 2] = -1.0
    faces = np.zeros((1, 3), dtype=np.int64)
    edges, _ = surface_edges(np.array([[1.25, 2.0, 2.0]]), faces, sdf)
    assert edges.tolist() == [[(1 * 4 + 2) * 4 + 2, (2 * 4 + 2) * 4 + 2]]
    with pytest.raises(RuntimeError, match="off grid edges"):
        surface_edges(np.array([[1.5, 2.5, 2.0]]), faces, sdf)
    with pytest.raises(RuntimeError, match="sign change"):
        surface_edges(np.array([[2.5, 2.0, 2.0]]), faces, sdf)


def test_ambiguous_cells_of_a_noisy_grid_give_vertices_on_sign_change_edges():
    # Random SDF values make many ambiguous cells, where Lewiner's marching cubes would put
    # vertices inside cells (no grid edge to re-interpolate along); every vertex must lie
    # on an edge whose corners change sign.
    from renderers.isosurface import marching_cubes, surface_edges

    rng = np.random.default_rng(0)
    sdf = rng.standard_normal((12, 12, 12)).astype(np.float32)
    verts, faces = marching_cubes(sdf)
    edges, faces = surface_edges(verts, faces, sdf)
    flat = sdf.reshape(-1)
    assert len(faces) > 100
    assert (flat[edges[:, 0]] * flat[edges[:, 1]] < 0).all()


def test_repair_of_empty_grids_has_the_reference_surfaces():
    """All outside (SDF 0.3): the centre point drops to 0.3 - 1 - 0.3 = -1, so the surface is
    the octahedron of the 6 edges from it, vertices h / 1.3 from the centre. All inside
    (-0.3): the two border layers rise to 1.0, vertices 1 / 1.3 of an edge inside them."""
    res, h = 9, 0.25
    zeros = torch.zeros(res, res, res, 3, dtype=torch.float64)
    full = torch.full((res, res, res), 0.3, dtype=torch.float64)
    (m,) = extract_surface(GridField(full, zeros), res, n_objects=1, repair_empty=True)
    assert m.repaired and not m.empty and len(m.verts) == 6
    center = grid_points(torch.tensor(4 * 81 + 4 * 9 + 4), res, 1.0, torch.float64)
    dist = (m.verts - center).norm(dim=1)
    torch.testing.assert_close(dist, torch.full((6,), h / 1.3, dtype=torch.float64))
    (m,) = extract_surface(GridField(-full, zeros), res, n_objects=1, repair_empty=True)
    extent = -1.0 + (1 + 1 / 1.3) * h
    torch.testing.assert_close(m.verts.min(0).values, torch.full((3,), extent, dtype=torch.float64))
    torch.testing.assert_close(
        m.verts.max(0).values, torch.full((3,), -extent, dtype=torch.float64)
    )
    # without the repair both are empty; a grid with a surface is never repaired
    assert extract_surface(GridField(full, zeros), res, n_objects=1)[0].empty
    (m,) = extract_surface(SphereField(torch.tensor([0.5])), res, n_objects=1, repair_empty=True)
    assert not m.repaired


def test_repaired_vertices_have_the_gradients_of_the_repair_formula():
    """gradcheck through the repair: the offsets 1 + max and 1 - min keep their gradients."""
    res = 5
    gen = torch.Generator().manual_seed(0)
    values = (0.2 + 0.3 * torch.rand(res, res, res, generator=gen)).to(torch.float64)
    deform = 0.5 * torch.randn(res, res, res, 3, generator=gen, dtype=torch.float64)

    def verts(v):
        (m,) = extract_surface(
            GridField(v, deform), res, n_objects=1, repair_empty=True, dtype=torch.float64
        )
        return m.verts

    for sign in (1.0, -1.0):
        (m,) = extract_surface(
            GridField(sign * values, deform), res, n_objects=1, repair_empty=True
        )
        assert m.repaired and len(m.faces) > 0
        inputs = ((sign * values).requires_grad_(True),)
        assert torch.autograd.gradcheck(verts, inputs, eps=1e-6, atol=1e-6)
