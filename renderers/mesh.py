"""Mesh renders of the training loop's second branch (docs/rendering.md, "Mesh branch": the mesh
extracted from the SDF is rasterized to RGB, mask, normalized depth and camera-space
normals, which the teachers score beside the volume renders)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from renderers.cameras import Cameras, pixel_rays, world_to_clip
from renderers.field import Field
from renderers.marching import ISOSURFACE_METHODS


@dataclass
class MeshRenderConfig:
    """Settings of the mesh branch."""

    enabled: bool = True
    """Render the extracted mesh and feed it to the teachers (off: volume branch only)."""
    resolution: int = 512
    """Square render size in pixels (the reference rasterizes at 512x512)."""
    grad_scale: float = 0.001
    """Factor on SDF gradients arriving through this branch (reference value 0.001)."""
    repair_empty: bool = True
    """An SDF without a sign change gets the reference's repaired surface
    (``renderers.isosurface``), so the teachers still see a mesh and their gradients reach
    the field; off: it renders as background and the branch gives no gradient."""
    backend: str = "torch"
    """Raster backend: "torch" (default: pure torch, CPU and CUDA), "nvdiffrast" (CUDA, the
    optional ``[cuda]`` extra) or "auto" (nvdiffrast on CUDA when installed, else torch)."""
    isosurface: str = "skimage"
    """Marching cubes of the training mesh: "skimage" (the library, on the host: a GPU
    run copies each object's grid there) or "torch" (``renderers.marching``, on the
    grid's device)."""
    view_chunk: int = 0
    """Views per object rasterized and shaded per checkpointed segment (``render_mesh``):
    the backward holds one segment's raster graph instead of all views' (same renders and
    gradients; every view rasterized twice). 0: all views in one graph. Meant for the
    torch backend, whose 512 px graph is large; nvdiffrast's keeps little."""

    def __post_init__(self):
        if self.resolution < 1:
            raise ValueError(f"mesh render resolution must be >= 1, got {self.resolution}")
        if self.view_chunk < 0:
            raise ValueError(f"mesh.view_chunk must be >= 0 (0: no chunks), got {self.view_chunk}")
        if not self.grad_scale >= 0.0:
            raise ValueError(f"grad_scale must be >= 0, got {self.grad_scale}")
        if self.isosurface not in ISOSURFACE_METHODS:
            raise ValueError(
                f"mesh.isosurface must be one of {ISOSURFACE_METHODS}, got {self.isosurface!r}"
            )
        if self.backend not in ("auto", "torch", "nvdiffrast"):
            raise ValueError(
                f"backend must be 'auto', 'torch' or 'nvdiffrast', got {self.backend!r}"
            )


@dataclass
class MeshRender:
    """Renders of N = B*V views, views of one object contiguous; images top row first.

    ``depth`` is (far - d) / (far - near) of the view-axis depth d (1 at the near plane,
    0 at the far plane) on the object, 0 on background; invert with
    ``d = far - depth * (far - near)`` where mask is 1. ``normal`` holds camera-space unit
    normals (x right, y up, z towards the camera), interpolated from area-weighted vertex
    normals (outward when faces wind counter-clockwise seen from outside); 0 on background.
    All four are antialiased, so on silhouette pixels rgb is blended with the background
    and depth and normal are premultiplied by coverage.
    """

    rgb: torch.Tensor  # (N, H, W, 3) in [0, 1]
    mask: torch.Tensor  # (N, H, W) in [0, 1]
    depth: torch.Tensor  # (N, H, W) in [0, 1]
    normal: torch.Tensor  # (N, H, W, 3)
    near: float
    far: float


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V, 3) unit vertex normals: sums of the adjacent faces' area-weighted normals
    (outward for counter-clockwise faces seen from outside). verts (V, 3); faces (F, 3)."""
    f = faces.long()
    v0, v1, v2 = verts[f[:, 0]], verts[f[:, 1]], verts[f[:, 2]]
    fn = torch.linalg.cross(v1 - v0, v2 - v0)  # length = 2 * area
    n = torch.zeros_like(verts).index_add(0, f.reshape(-1), fn.repeat_interleave(3, dim=0))
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-12)


def _check_meshes(verts, faces):
    if len(verts) != len(faces):
        raise ValueError(
            f"verts and faces must list the same objects: {len(verts)} vs {len(faces)}"
        )
    for i, (v, f) in enumerate(zip(verts, faces)):
        if v.ndim != 2 or v.shape[1] != 3:
            raise ValueError(f"verts[{i}] must be (V, 3), got {tuple(v.shape)}")
        if f.ndim != 2 or f.shape[1] != 3:
            raise ValueError(f"faces[{i}] must be (F, 3), got {tuple(f.shape)}")


def render_mesh(
    verts: list[torch.Tensor],
    faces: list[torch.Tensor],
    field: Field,
    cameras: Cameras,
    resolution: int | tuple[int, int],
    backend,
    object_index=None,
    near: float = 0.1,
    far: float = 4.0,
    background=(1.0, 1.0, 1.0),
    view_chunk: int = 0,
) -> MeshRender:
    """Rasterize B objects' meshes from their V views each and shade them with the field.

    verts: B tensors (V_b, 3) world positions (differentiable); faces: B tensors (F_b, 3)
    int; an object with no faces renders as background. cameras: B*V cameras, object b's
    views at [b*V, (b+1)*V). backend: from ``renderers.raster.get_backend``.
    object_index: the field object of each mesh (default 0..B-1); the field is queried
    with ``len(field)`` rows when it has a length, else ``max(object_index) + 1``.
    near, far: clip planes, also the depth normalization. background: RGB (3,), or a
    callable mapping each object's pixel ray directions (B, R, 3) to colours (B, R, 3) (a
    learned background). The colour is the field's albedo
    at the interpolated surface point (unlit). Returns a ``MeshRender`` in the cameras'
    dtype, differentiable with respect to verts (through u, v and antialias) and the
    field's parameters. view_chunk > 0 (with gradients on): every object's views are
    rendered ``view_chunk`` at a time, each chunk (of all objects) a checkpointed segment
    recomputed in backward; every step works per view or per pixel, so the renders and
    gradients are those of one pass.
    """
    _check_meshes(verts, faces)
    n_obj = len(verts)
    if n_obj == 0 or len(cameras) % n_obj:
        raise ValueError(f"{len(cameras)} cameras do not split into {n_obj} objects' views")
    n_views = len(cameras) // n_obj
    if 0 < view_chunk < n_views and torch.is_grad_enabled():
        parts = []
        for first in range(0, n_views, view_chunk):
            last = min(first + view_chunk, n_views)
            picked = [b * n_views + i for b in range(n_obj) for i in range(first, last)]
            cams = cameras.index(torch.tensor(picked, device=cameras.device))

            def chunk(*v, cams=cams):
                out = render_mesh(v, faces, field, cams, resolution, backend, object_index,
                                  near, far, background)  # fmt: skip
                return out.rgb, out.mask, out.depth, out.normal

            parts.append(checkpoint(chunk, *verts, use_reentrant=False))

        def joined(i: int) -> torch.Tensor:
            # chunks are object-major: (n_obj * views in chunk, ...) -> (n_obj * n_views, ...)
            per_obj = [p[i].unflatten(0, (n_obj, -1)) for p in parts]
            return torch.cat(per_obj, dim=1).flatten(0, 1)

        return MeshRender(joined(0), joined(1), joined(2), joined(3), near=near, far=far)
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    obj = list(range(n_obj)) if object_index is None else [int(i) for i in object_index]
    if len(obj) != n_obj:
        raise ValueError(f"object_index must have {n_obj} entries, got {len(obj)}")
    dtype, device = cameras.c2w.dtype, cameras.device
    if callable(background):
        # one colour per pixel, from the pixel's ray; rows bottom-first as rasterized
        _, dirs = pixel_rays(cameras, height, width)
        bg = background(dirs.reshape(n_obj, -1, 3)).reshape(-1, height, width, 3).flip(1)
    else:
        bg = torch.as_tensor(background, dtype=dtype, device=device).expand(
            len(cameras), height, width, 3
        )

    # 1. Rasterize each object's views and interpolate world points, depths and normals.
    per_obj = []
    for b in range(n_obj):
        cams = cameras.index(slice(b * n_views, (b + 1) * n_views))
        v, f = verts[b].to(dtype), faces[b].to(device=device, dtype=torch.int32)
        if f.shape[0] == 0:
            per_obj.append(None)
            continue
        w2c = cams.w2c()
        v_h = torch.cat([v, torch.ones_like(v[:, :1])], dim=1)  # (V_b, 4)
        pos = v_h @ world_to_clip(cams, near, far).transpose(1, 2)  # (V, V_b, 4)
        rast, _ = backend.rasterize(pos, f, (height, width))
        v_cam = v_h @ w2c.transpose(1, 2)  # (V, V_b, 4)
        n_cam = vertex_normals(v, f) @ w2c[:, :3, :3].transpose(1, 2)  # (V, V_b, 3)
        attrs = torch.cat([v.expand(n_views, -1, -1), -v_cam[..., 2:3], n_cam], dim=-1)
        geo, _ = backend.interpolate(attrs.contiguous(), rast, f)  # (V, H, W, 7)
        per_obj.append((pos, f, rast, geo))

    # 2. One field query for all objects' covered pixels (padded to a common length).
    covered = [None if o is None else o[2][..., 3] > 0 for o in per_obj]
    counts = [0 if c is None else int(c.sum()) for c in covered]
    n_rows = len(field) if hasattr(field, "__len__") else max(obj) + 1
    if max(obj) >= n_rows:
        raise ValueError(f"object_index {obj} exceeds the field's {n_rows} objects")
    points = torch.zeros(n_rows, max(max(counts), 1), 3, dtype=dtype, device=device)
    for b, o in enumerate(per_obj):
        if o is not None:
            points[obj[b], : counts[b]] = o[3][..., :3][covered[b]]
    albedo = field.color(points)  # (rows, N, 3)

    # 3. Shade, composite, antialias, flip to top-row-first.
    rgb, mask, depth, normal = [], [], [], []
    for b, o in enumerate(per_obj):
        bg_b = bg[b * n_views : (b + 1) * n_views]
        if o is None:
            rgb.append(bg_b.flip(1))
            zero = torch.zeros(n_views, height, width, dtype=dtype, device=device)
            mask.append(zero)
            depth.append(zero)
            normal.append(torch.zeros(n_views, height, width, 3, dtype=dtype, device=device))
            continue
        pos, f, rast, geo = o
        cov = covered[b][..., None].to(dtype)
        color = torch.zeros(n_views, height, width, 3, dtype=dtype, device=device)
        color = color.index_put((covered[b],), albedo[obj[b], : counts[b]])
        d = ((far - geo[..., 3:4]) / (far - near)) * cov
        nrm = torch.nn.functional.normalize(geo[..., 4:7], dim=-1, eps=1e-12) * cov
        img = torch.cat([color * cov + bg_b * (1 - cov), cov, d, nrm], dim=-1)
        img = backend.antialias(img.contiguous(), rast, pos, f).flip(1)
        rgb.append(img[..., :3])
        mask.append(img[..., 3])
        depth.append(img[..., 4])
        normal.append(img[..., 5:8])
    return MeshRender(
        rgb=torch.cat(rgb).clamp(0, 1),
        mask=torch.cat(mask),
        depth=torch.cat(depth),
        normal=torch.cat(normal),
        near=near,
        far=far,
    )
