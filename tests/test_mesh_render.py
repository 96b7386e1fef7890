"""Mesh renders of a sphere against the closed form; gradients; the turntable preview."""

import importlib.util
import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh

from prd.preview import turntable
from renderers.cameras import camera_space, orbit_cameras, pixel_rays
from renderers.field import SphereField
from renderers.grad_scale import scale_grad
from renderers.mesh import MeshRenderConfig, render_mesh
from renderers.raster import get_backend

RADIUS, DIST, FOV, SIZE = 0.5, 1.5, 40.0, 64
NEAR, FAR = 0.1, 4.0


def icosphere(radius=RADIUS, subdivisions=3):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)


def analytic_sphere(cams, radius=RADIUS):
    """Per pixel (top row first): hit mask, camera-space normal, view depth of the sphere."""
    o, d = pixel_rays(cams, SIZE, SIZE)
    o, d = o.double(), d.double()
    b = (o * d).sum(-1)
    disc = b**2 - ((o * o).sum(-1) - radius**2)
    hit = disc > 0
    t = -b - disc.clamp(min=0).sqrt()
    p = (o + t[..., None] * d).reshape(len(cams), -1, 3)
    cams64 = cams.to(dtype=torch.float64)
    rot = cams64.w2c()[:, :3, :3]
    n_cam = (p / radius) @ rot.transpose(1, 2)
    depth = -camera_space(p, cams64)[..., 2]
    return hit, n_cam.reshape(*hit.shape, 3), depth.reshape(hit.shape)


def test_sphere_render_matches_closed_form():
    verts, faces = icosphere(subdivisions=4)
    cams = orbit_cameras(
        torch.tensor([0.0, 90.0, 200.0]), torch.tensor([20.0, -10.0, 45.0]), DIST, FOV
    )
    out = render_mesh([verts], [faces], SphereField(RADIUS), cams, SIZE, get_backend("torch"))
    hit, normal, depth = analytic_sphere(cams)
    mask = out.mask > 0.5
    iou = (mask & hit).sum() / (mask | hit).sum()
    assert iou > 0.97
    # Interior pixels (fully covered, away from the rim): normals and depth.
    inner = (out.mask > 0.999) & hit
    cos = (out.normal.double() * normal).sum(-1)[inner]
    assert cos.mean() > 0.999 and cos.min() > 0.99
    d = FAR - out.depth.double() * (FAR - NEAR)
    # Facet centres lie ~5e-4 inside the sphere (subdivision 4); along rays facing the
    # surface (normal z > 0.5) that is at most ~1e-3 of depth, more at grazing angles.
    facing = inner & (normal[..., 2] > 0.5)
    assert (d[facing] - depth[facing]).abs().max() < 3e-3
    assert torch.allclose(out.rgb[inner], torch.tensor([0.8, 0.3, 0.2]))
    assert (out.rgb[out.mask == 0] == 1).all() and (out.depth[out.mask == 0] == 0).all()
    # The disk's area: the antialiased mask sums to the projected area within 2%.
    f = SIZE / 2 / math.tan(math.radians(FOV) / 2)
    disk = math.pi * (f * math.tan(math.asin(RADIUS / DIST))) ** 2
    assert out.mask.sum(dim=(1, 2)).sub(disk).abs().max() / disk < 0.02


def test_mask_gradient_wrt_vertices_matches_area_derivative():
    """d(sum mask)/d(scale) vs central differences of the forward.

    An icosahedron at 128 px: every rim triangle is wider than a pixel on screen, which
    pair-based antialiasing needs to see its silhouette edge (as nvdiffrast's; on a finer
    sphere at low resolution the rim triangles are thinner than a pixel and part of the
    gradient is lost: renderers.raster.antialias states the measured shares)."""
    verts, faces = icosphere(subdivisions=0)
    cams = orbit_cameras(30.0, 15.0, DIST, FOV)
    backend = get_backend("torch")
    size = 128
    area = lambda s: render_mesh([verts * s], [faces], SphereField(RADIUS), cams, size, backend)
    scale = torch.tensor(1.0, requires_grad=True)
    area(scale).mask.sum().backward()
    h = 0.02
    with torch.no_grad():
        fd = (area(torch.tensor(1 + h)).mask.sum() - area(torch.tensor(1 - h)).mask.sum()) / (2 * h)
    assert abs(scale.grad.item() - fd.item()) / fd.item() < 0.05


def test_field_colour_gradient_is_the_coverage():
    """rgb = AA(c * cov + bg * (1 - cov)) is linear in c, so d(sum rgb)/dc = sum(mask)."""
    verts, faces = icosphere(subdivisions=2)
    field = SphereField(RADIUS, color=(0.4, 0.5, 0.6))
    field.rgb.requires_grad_(True)
    cams = orbit_cameras(torch.tensor([10.0, 100.0]), 5.0, DIST, FOV)
    out = render_mesh([verts], [faces], field, cams, 32, get_backend("torch"), background=(0, 0, 0))
    out.rgb.sum(dim=(0, 1, 2)).sum().backward()
    assert torch.allclose(field.rgb.grad, out.mask.sum().expand(3), rtol=1e-5)


def test_objects_views_are_contiguous_and_empty_meshes_render_background():
    v_small, f_small = icosphere(radius=0.3, subdivisions=2)
    empty_v, empty_f = torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64)
    cams = orbit_cameras(torch.tensor([0.0, 180.0] * 3), 10.0, DIST, FOV)
    field = SphereField(0.3, color=(0.2, 0.9, 0.1))
    out = render_mesh(
        [v_small, empty_v, v_small],
        [f_small, empty_f, f_small],
        field,
        cams,
        24,
        get_backend("torch"),
        object_index=[0, 1, 2],
        background=(0.5, 0.5, 0.5),
    )
    assert out.rgb.shape == (6, 24, 24, 3) and out.normal.shape == (6, 24, 24, 3)
    area = out.mask.sum(dim=(1, 2))
    assert (area[[2, 3]] == 0).all() and (area[[0, 1, 4, 5]] > 20).all()
    assert torch.allclose(area[0], area[4]) and (out.rgb[2:4] == 0.5).all()
    with pytest.raises(ValueError, match="do not split"):
        render_mesh([v_small] * 4, [f_small] * 4, field, cams, 24, get_backend("torch"))


def test_scale_grad_and_config_checks():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = scale_grad(x, 0.001)
    assert torch.equal(y, x)
    (y * torch.tensor([3.0, 5.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.003, 0.005]))
    assert MeshRenderConfig().grad_scale == 0.001
    with pytest.raises(ValueError, match="backend"):
        MeshRenderConfig(backend="opengl")
    with pytest.raises(ValueError, match="view_chunk must be >= 0.*-2"):
        MeshRenderConfig(view_chunk=-2)


def test_turntable_writes_frames(tmp_path):
    m = trimesh.creation.icosphere(subdivisions=2, radius=0.4)
    colors = np.tile([[0.9, 0.1, 0.1]], (len(m.vertices), 1))
    path = turntable(m.vertices, m.faces, colors, tmp_path / "t.gif", n_frames=4, resolution=32)
    frames = iio.imread(path, index=None)
    assert frames.shape == (4, 32, 32, 3)
    centre = frames[:, 16, 16].astype(int)
    assert (centre[:, 0] > 2 * centre[:, 1]).all()  # red, shaded
    assert (frames[:, 0, 0] == 255).all()  # white background
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        with pytest.raises(ImportError, match="imageio-ffmpeg"):
            turntable(m.vertices, m.faces, colors, tmp_path / "t.mp4", n_frames=2, resolution=16)


def test_view_chunks_give_the_same_renders_and_gradients():
    """Two objects x 3 views rendered in one graph and in checkpointed chunks of 2 views
    (a remainder chunk of 1): equal renders and gradients w.r.t. the vertices, the field's
    colour and a learned background's parameter (a per-ray colour)."""
    base_v, faces = icosphere(radius=0.4, subdivisions=2)
    cams = orbit_cameras(torch.tensor([0.0, 100.0, 230.0] * 2), 15.0, DIST, FOV)
    runs = []
    for chunk in (0, 2):
        verts = [base_v.clone().requires_grad_(True), (base_v * 0.8).requires_grad_(True)]
        field = SphereField(0.4, color=[(0.2, 0.9, 0.1), (0.7, 0.3, 0.5)])
        field.rgb.requires_grad_(True)
        tint = torch.tensor([0.3, 0.6, 0.9], requires_grad=True)

        def background(dirs, tint=tint):  # (B, R, 3) ray directions -> colours
            return torch.sigmoid(dirs * tint)

        out = render_mesh(verts, [faces, faces], field, cams, 24, get_backend("torch"),
                          background=background, view_chunk=chunk)  # fmt: skip
        w = torch.linspace(0.5, 1.5, 24)  # weights make the loss see positions
        loss = (out.rgb * w[:, None]).sum() + (out.mask * w).sum() + out.depth.square().sum()
        (loss + (out.normal * torch.tensor([1.0, -2.0, 0.5])).sum()).backward()
        maps = (out.rgb, out.mask, out.depth, out.normal)
        runs.append((maps, [v.grad for v in verts], field.rgb.grad, tint.grad))
    (maps_a, dv_a, dc_a, dt_a), (maps_b, dv_b, dc_b, dt_b) = runs
    assert maps_b[0].shape == (6, 24, 24, 3) and maps_a[1][3:].sum() > 10
    for a, b in zip(maps_a, maps_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip([*dv_a, dc_a, dt_a], [*dv_b, dc_b, dt_b], strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
