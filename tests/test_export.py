"""Mesh export: round trips through trimesh, the +y-up frame, baked textures, slugs."""

import numpy as np
import pytest
import torch
import trimesh

from prd.export import WORLD_TO_GLTF, dilate, export_mesh, rasterize_uv, slugify


def _sphere(subdivisions=2):
    m = trimesh.creation.icosphere(subdivisions)
    return m.vertices, m.faces


def _load(path):
    return trimesh.load(path, force="mesh", process=False)


def _position_colors(points):
    return (np.asarray(points) + 1.0) / 2.0


def test_glb_vertex_colors_exact_and_y_up(tmp_path):
    v, f = _sphere()
    rng = np.random.default_rng(0)
    colors = rng.random((len(v), 3))
    out = export_mesh(torch.tensor(v), torch.tensor(f), torch.tensor(colors), tmp_path / "a.glb")
    mesh = _load(out)
    assert len(mesh.vertices) == len(v)
    expect = np.round(colors * 255).astype(np.uint8)
    np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], expect)
    assert (mesh.visual.vertex_colors[:, 3] == 255).all()
    # World +z (top) is file +y; world +y is file -z; orientation (volume sign) is kept.
    top, side = np.argmax(v[:, 2]), np.argmax(v[:, 1])
    np.testing.assert_allclose(mesh.vertices[top], [0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(mesh.vertices[side], [0, 0, -1], atol=1e-6)
    np.testing.assert_allclose(mesh.vertices, v @ WORLD_TO_GLTF.T, atol=1e-6)
    assert np.linalg.det(WORLD_TO_GLTF) == pytest.approx(1.0)
    assert mesh.volume == pytest.approx(trimesh.Trimesh(v, f).volume, rel=1e-5)


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_obj_ply_round_trip(tmp_path, suffix):
    v, f = _sphere()
    colors = _position_colors(v)
    mesh = _load(export_mesh(v, f, colors, tmp_path / f"b{suffix}"))
    frame = WORLD_TO_GLTF if suffix == ".obj" else np.eye(3)  # PLY keeps the world frame
    np.testing.assert_allclose(mesh.vertices, v @ frame.T, atol=1e-6)
    np.testing.assert_array_equal(mesh.faces, f)
    got = mesh.visual.vertex_colors[:, :3].astype(int)
    assert np.abs(got - np.round(colors * 255)).max() <= 1


def _sample_texture(mesh, uv):
    """Nearest texel at uv, in the baker's convention (v up, row 0 at v = 1)."""
    img = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB")) / 255.0
    h, w = img.shape[:2]
    x = np.clip(np.round(uv[:, 0] * w - 0.5), 0, w - 1).astype(int)
    y = np.clip(np.round((1.0 - uv[:, 1]) * h - 0.5), 0, h - 1).astype(int)
    return img[y, x]


@pytest.mark.parametrize("use_fn", [False, True])
def test_textured_glb_reloads_with_uvs_and_baked_colors(tmp_path, use_fn):
    v, f = _sphere()
    # Vertex colours = position colours; with color_fn the vertex colours are a decoy.
    colors = np.zeros_like(v) if use_fn else _position_colors(v)
    fn = (lambda p: (p + 1.0) / 2.0) if use_fn else None
    out = export_mesh(v, f, colors, tmp_path / "c.glb", texture=True, texture_size=128, color_fn=fn)
    mesh = _load(out)
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    uv = mesh.visual.uv
    assert uv.shape == (len(mesh.vertices), 2) and uv.min() >= 0 and uv.max() <= 1
    assert mesh.visual.material.baseColorTexture.size == (128, 128)
    world = mesh.vertices @ WORLD_TO_GLTF  # file = R world, so world = R^T file
    # Face centroids read their colour from inside the triangle: exact up to uint8 steps
    # and the texel grid; vertices read it across dilated seams.
    centroid_err = _sample_texture(mesh, uv[mesh.faces].mean(1)) - _position_colors(
        world[mesh.faces].mean(1)
    )
    assert np.abs(centroid_err).max() < 0.02
    assert np.abs(_sample_texture(mesh, uv) - _position_colors(world)).max() < 0.05


def test_simplify_respects_budget_and_carries_colors(tmp_path):
    v, f = _sphere(4)  # 5120 faces
    mesh = _load(export_mesh(v, f, _position_colors(v), tmp_path / "d.ply", max_faces=500))
    assert 400 <= len(mesh.faces) <= 500
    # Each kept vertex has the colour of the nearest original vertex: close to its own.
    got = mesh.visual.vertex_colors[:, :3] / 255.0
    assert np.abs(got - _position_colors(mesh.vertices)).max() < 0.1


def test_bad_inputs_raise_naming_the_path(tmp_path):
    v, f = _sphere(1)
    c = _position_colors(v)
    with pytest.raises(ValueError, match="x.stl"):
        export_mesh(v, f, c, tmp_path / "x.stl")
    with pytest.raises(ValueError, match="e.glb.*empty"):
        export_mesh(np.zeros((0, 3)), np.zeros((0, 3), int), np.zeros((0, 3)), tmp_path / "e.glb")
    with pytest.raises(ValueError, match="t.obj"):
        export_mesh(v, f, c, tmp_path / "t.obj", texture=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        export_mesh(v, f, c * 2, tmp_path / "y.glb")


def test_rasterize_uv_covers_square_with_exact_barycentrics():
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    size = 16
    tri, bary = rasterize_uv(uv, faces, size, max_texels=50)  # forces several chunks
    assert (tri >= 0).all()
    rows, cols = np.mgrid[:size, :size]
    centre = np.stack([(cols + 0.5) / size, 1.0 - (rows + 0.5) / size], axis=-1)
    interp = (uv[faces[tri]] * bary[..., None]).sum(axis=2)
    np.testing.assert_allclose(interp, centre, atol=1e-12)
    # The diagonal u = v splits the square: below it (v < u) triangle 0, above triangle 1.
    below = centre[..., 1] < centre[..., 0] - 1e-9
    assert (tri[below] == 0).all() and (tri[centre[..., 1] > centre[..., 0] + 1e-9] == 1).all()


def test_dilate_grows_one_ring_per_pass():
    image = np.zeros((7, 7, 3))
    filled = np.zeros((7, 7), bool)
    image[3, 3], filled[3, 3] = (0.2, 0.4, 0.6), True
    out = dilate(image, filled, iterations=2)
    np.testing.assert_allclose(out[1:6, 1:6], np.broadcast_to([0.2, 0.4, 0.6], (5, 5, 3)))
    assert (out[0] == 0).all() and (out[:, 6] == 0).all()


@pytest.mark.parametrize(
    "text, slug",
    [
        ("A red cube!", "a-red-cube"),
        ("  --Hello__World--  ", "hello-world"),
        ("Ünïcode café 42", "n-code-caf-42"),
        ("x", "x"),
    ],
)
def test_slugify(text, slug):
    assert slugify(text) == slug


@pytest.mark.parametrize("text", ["", "!!!", "---"])
def test_slugify_empty_raises(text):
    with pytest.raises(ValueError, match="file name"):
        slugify(text)
