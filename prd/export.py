"""Mesh export: GLB (default), OBJ or PLY, vertex colours or a baked texture.

Frames: the project's world is right-handed with +z up (``renderers.cameras``); glTF (and
by custom OBJ) is +y up. GLB and OBJ files therefore hold R @ p with the rotation of -90
degrees about +x,

    R = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]:   (x, y, z) -> (x, z, -y),

so world +z becomes file +y and world +y becomes file -z (det R = +1: still right-handed).
PLY files keep the world frame.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import fast_simplification
import numpy as np
import torch
import trimesh
import xatlas
from PIL import Image
from scipy.spatial import cKDTree

WORLD_TO_GLTF = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
"""Rotation taking the +z-up world frame to glTF's +y-up frame (module docstring)."""

SUFFIXES = (".glb", ".obj", ".ply")

ColorFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]
"""points (N, 3) float32 CPU tensor, world frame -> colours (N, 3) in [0, 1]."""

_SEAM_TEXELS = 4
"""Texels by which seams are dilated (and charts kept apart in the atlas)."""

_COLOR_CHUNK = 1 << 18
"""Texels coloured per color_fn call (bounds the field's activation memory)."""


def slugify(text: str) -> str:
    """A file-name-safe slug: lower case, runs outside [a-z0-9] become one '-', no '-' at
    either end ("A red cube!" -> "a-red-cube"). Raises ValueError when nothing is left."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not slug:
        raise ValueError(f"text {text!r} has no letters or digits to make a file name from")
    return slug


def _array(x, name: str, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=dtype)
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"{name} must be (N, 3), got shape {x.shape}")
    return x


def _unit_colors(x, name: str) -> np.ndarray:
    x = _array(x, name, np.float64)
    if not np.isfinite(x).all() or x.min(initial=0.0) < -1e-6 or x.max(initial=0.0) > 1 + 1e-6:
        raise ValueError(f"{name} must be finite and in [0, 1], got range [{x.min()}, {x.max()}]")
    return x.clip(0.0, 1.0)


def export_mesh(
    verts,
    faces,
    vertex_colors,
    path: str | Path,
    *,
    texture: bool = False,
    texture_size: int = 1024,
    color_fn: ColorFn | None = None,
    max_faces: int | None = None,
) -> Path:
    """Write a mesh to ``path``; the suffix (.glb, .obj, .ply) picks the format.

    verts (V, 3) world frame (+z up), faces (F, 3) integer, vertex_colors (V, 3) in [0, 1]:
    numpy arrays or tensors (any device). Colours are stored as uint8 RGBA (alpha 255).
    max_faces: simplify to at most this many faces first (colours follow the nearest
    original vertex). texture (GLB only): unwrap with xatlas and bake a texture_size^2
    texture, texels coloured by ``color_fn`` at their world points when given, else by
    interpolating the vertex colours; seams are dilated. Returns the path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"cannot export {path}: suffix must be one of {SUFFIXES}")
    if texture and suffix != ".glb":
        raise ValueError(f"cannot export {path}: a baked texture is written to .glb only")
    v = _array(verts, "verts", np.float64)
    f = _array(faces, "faces", np.int64)
    colors = _unit_colors(vertex_colors, "vertex_colors")
    if len(v) == 0 or len(f) == 0:
        raise ValueError(
            f"cannot export {path}: the mesh is empty ({len(v)} verts, {len(f)} faces)"
        )
    if len(colors) != len(v):
        raise ValueError(f"vertex_colors has {len(colors)} rows for {len(v)} verts")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"faces index vertices in [{f.min()}, {f.max()}], have {len(v)}")
    if max_faces is not None:
        v, f, colors = simplify(v, f, colors, max_faces)

    if texture:
        mesh = _textured_mesh(v, f, colors, texture_size, color_fn)
    else:
        rgba = np.concatenate([_to_uint8(colors), np.full((len(v), 1), 255, np.uint8)], axis=1)
        mesh = trimesh.Trimesh(v, f, vertex_colors=rgba, process=False)
    if suffix != ".ply":
        mesh.apply_transform(_homogeneous(WORLD_TO_GLTF))
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(path, file_type=suffix[1:])
    return path


def simplify(verts, faces, colors, max_faces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quadric decimation to at most max_faces faces; each kept vertex takes the colour of
    the nearest original vertex (decimation moves vertices, it does not carry attributes).
    Inputs: numpy arrays or tensors (any device), as ``export_mesh`` takes them."""
    if max_faces < 1:
        raise ValueError(f"max_faces must be >= 1, got {max_faces}")
    verts = _array(verts, "verts", np.float64)
    faces = _array(faces, "faces", np.int64)
    colors = _array(colors, "vertex_colors", np.float64)
    if len(faces) <= max_faces:
        return verts, faces, colors
    v, f = fast_simplification.simplify(verts, faces, target_count=max_faces)
    if len(f) > max_faces:
        raise RuntimeError(f"decimation left {len(f)} faces, above the budget of {max_faces}")
    _, nearest = cKDTree(verts).query(v)
    return np.asarray(v, np.float64), np.asarray(f, np.int64), colors[nearest]


def _to_uint8(colors: np.ndarray) -> np.ndarray:
    # clipped: the reference's colour activation reaches 0.001 past [0, 1]
    return np.round(np.clip(colors, 0.0, 1.0) * 255.0).astype(np.uint8)


def _homogeneous(rotation: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation
    return m


def _textured_mesh(
    verts: np.ndarray, faces: np.ndarray, colors: np.ndarray, size: int, color_fn
) -> trimesh.Trimesh:
    """UV-unwrapped mesh with a baked base-colour texture (unlit albedo: metallic 0)."""
    if size < 8:
        raise ValueError(f"texture_size must be >= 8, got {size}")
    atlas = xatlas.Atlas()
    atlas.add_mesh(verts.astype(np.float32), faces.astype(np.uint32))
    pack = xatlas.PackOptions()
    # Charts `padding` texels apart at the final resolution, so the seam dilation below
    # never reaches into a neighbouring chart.
    pack.resolution, pack.padding, pack.bilinear = size, _SEAM_TEXELS, True
    atlas.generate(pack_options=pack)
    vmap, uv_faces, uv = atlas[0]
    uv_faces = uv_faces.astype(np.int64)
    tri, bary = rasterize_uv(uv, uv_faces, size)
    covered = tri >= 0
    corners = uv_faces[tri[covered]]  # (T, 3) indices into the unwrapped vertices
    w = bary[covered][..., None]
    if color_fn is None:
        texel = (colors[vmap][corners] * w).sum(axis=1)
    else:
        points = (verts[vmap][corners] * w).sum(axis=1).astype(np.float32)
        texel = np.concatenate(
            [
                _unit_colors(color_fn(torch.from_numpy(points[i : i + _COLOR_CHUNK])), "color_fn")
                for i in range(0, len(points), _COLOR_CHUNK)
            ]
        )
    image = np.zeros((size, size, 3))
    image[covered] = texel
    image = dilate(image, covered, iterations=_SEAM_TEXELS)
    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(_to_uint8(image)), metallicFactor=0.0, roughnessFactor=1.0
    )
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(verts[vmap], uv_faces, visual=visual, process=False)


def rasterize_uv(
    uv: np.ndarray, faces: np.ndarray, size: int, max_texels: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre of a size x size texture, and where.

    uv (V, 2) in [0, 1] (trimesh's convention: v up, so image row 0 is v = 1), faces (F, 3).
    Texel (row i, col j) has its centre at uv ((j + 0.5) / size, 1 - (i + 0.5) / size).
    Returns tri (size, size) int64 (-1 where uncovered) and bary (size, size, 3) float64
    barycentric weights of the triangle's corners. Triangles are processed in chunks whose
    bounding boxes hold at most ~max_texels texels.
    """
    px = np.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5], axis=1)
    tri_px = px[faces]  # (F, 3, 2): x = column, y = row, in texel-centre units
    lo = np.clip(np.ceil(tri_px.min(axis=1)), 0, size - 1).astype(np.int64)
    hi = np.clip(np.floor(tri_px.max(axis=1)), 0, size - 1).astype(np.int64)
    extent = np.maximum(hi - lo + 1, 0)
    count = extent[:, 0] * extent[:, 1]
    tri_map = np.full((size, size), -1, dtype=np.int64)
    bary_map = np.zeros((size, size, 3))
    starts = np.concatenate([[0], np.cumsum(count)])
    f0 = 0
    while f0 < len(faces):
        f1 = max(f0 + 1, int(np.searchsorted(starts, starts[f0] + max_texels, side="right")) - 1)
        f1 = min(f1, len(faces))
        ids = np.repeat(np.arange(f0, f1), count[f0:f1])
        local = np.arange(len(ids)) - np.repeat(starts[f0:f1] - starts[f0], count[f0:f1])
        col = lo[ids, 0] + local % extent[ids, 0]
        row = lo[ids, 1] + local // extent[ids, 0]
        w = _barycentric(tri_px[ids], np.stack([col, row], axis=1).astype(np.float64))
        inside = (w >= -1e-9).all(axis=1)
        tri_map[row[inside], col[inside]] = ids[inside]
        bary_map[row[inside], col[inside]] = w[inside]
        f0 = f1
    return tri_map, bary_map


def _barycentric(tri: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Barycentric weights (N, 3) of points p (N, 2) in triangles tri (N, 3, 2); a
    degenerate triangle gives -1 weights (covers nothing)."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    cross = lambda u, w: u[:, 0] * w[:, 1] - u[:, 1] * w[:, 0]
    area = cross(b - a, c - a)
    safe = np.where(area == 0, 1.0, area)
    w1 = cross(p - a, c - a) / safe
    w2 = cross(b - a, p - a) / safe
    w = np.stack([1.0 - w1 - w2, w1, w2], axis=1)
    return np.where((area == 0)[:, None], -1.0, w)


def dilate(image: np.ndarray, filled: np.ndarray, iterations: int) -> np.ndarray:
    """Grow filled texels outwards: each pass gives every empty texel with filled
    8-neighbours their mean, so bilinear lookups across UV seams see no background."""
    image, filled = image.copy(), filled.copy()
    h, w = filled.shape
    for _ in range(iterations):
        img_p = np.pad(image * filled[..., None], ((1, 1), (1, 1), (0, 0)))
        fil_p = np.pad(filled.astype(np.float64), 1)
        total = np.zeros_like(image)
        n = np.zeros(filled.shape)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                total += img_p[dy : dy + h, dx : dx + w]
                n += fil_p[dy : dy + h, dx : dx + w]
        grow = ~filled & (n > 0)
        image[grow] = total[grow] / n[grow][:, None]
        filled |= grow
    return image
