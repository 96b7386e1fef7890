"""Turntable previews of sampled meshes: a GIF (or an MP4) of the mesh circling once."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from renderers.cameras import fov_for_extent, orbit_cameras, world_to_clip
from renderers.mesh import vertex_normals
from renderers.raster import TorchRaster

AMBIENT = 0.35
"""Share of unshaded light, so faces turned away from the light stay readable."""


def shade_views(
    verts: torch.Tensor,
    faces: torch.Tensor,
    vertex_colors: torch.Tensor,
    azimuths: torch.Tensor,
    resolution: int,
    elevation: float,
    distance: float,
    background=(1.0, 1.0, 1.0),
) -> torch.Tensor:
    """Lambertian renders of a vertex-coloured mesh (world +z up) around its centre.

    verts (V, 3), faces (F, 3), vertex_colors (V, 3) in [0, 1]; azimuths (N,) degrees.
    The light sits at the camera, raised by 30 degrees. Returns (N, H, W, 3) float32 in
    [0, 1], top row first.
    """
    verts = verts.float()
    centre = (verts.amax(0) + verts.amin(0)) / 2
    verts = verts - centre
    radius = float(verts.norm(dim=1).max().clamp(min=1e-6))
    fov = min(fov_for_extent(1.15 * radius, distance), 90.0)
    cams = orbit_cameras(azimuths, elevation, distance, fov_y=fov)
    near = max(distance - 2 * radius, 1e-3 * distance)
    far = distance + 2 * radius
    raster = TorchRaster()
    tri = faces.to(torch.int32)
    v_h = torch.cat([verts, torch.ones_like(verts[:, :1])], dim=1)
    pos = v_h @ world_to_clip(cams, near, far).transpose(1, 2)
    rast, _ = raster.rasterize(pos, tri, (resolution, resolution))
    n_cam = vertex_normals(verts, faces) @ cams.w2c()[:, :3, :3].transpose(1, 2)
    n = len(cams)
    attrs = torch.cat([vertex_colors.float().expand(n, -1, -1), n_cam], dim=-1)
    out, _ = raster.interpolate(attrs, rast, tri)
    normal = torch.nn.functional.normalize(out[..., 3:], dim=-1)
    light = torch.tensor([0.0, math.sin(math.radians(30)), math.cos(math.radians(30))])
    # Two-sided lighting: meshes from marching cubes may have faces of either winding.
    lambert = (normal @ light).abs()
    shaded = out[..., :3] * (AMBIENT + (1 - AMBIENT) * lambert[..., None])
    cov = (rast[..., 3:] > 0).float()
    bg = torch.tensor(background, dtype=torch.float32)
    img = raster.antialias(shaded * cov + bg * (1 - cov), rast, pos, tri)
    return img.flip(1).clamp(0, 1)


def turntable(
    verts,
    faces,
    vertex_colors,
    out_path,
    n_frames: int = 36,
    resolution: int = 256,
    elevation: float = 20.0,
    distance: float = 2.5,
    fps: float = 12.0,
) -> Path:
    """Write a turntable of a vertex-coloured mesh to ``out_path`` (.gif, or .mp4 when
    imageio-ffmpeg is installed).

    verts (V, 3) world coordinates (+z up), faces (F, 3) int, vertex_colors (V, 3) in
    [0, 1]; numpy arrays or tensors. The camera circles the mesh's bounding-box centre at
    ``distance`` (the fov frames the mesh) and ``elevation`` degrees, one frame per
    360/n_frames degrees. Returns the path written.
    """
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"turntable writes .gif or .mp4, got {out_path}")
    if suffix == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ImportError(f"writing {out_path} needs the package imageio-ffmpeg; or use .gif")
    if n_frames < 1 or resolution < 8 or distance <= 0:
        raise ValueError(
            f"need n_frames >= 1, resolution >= 8, distance > 0; got {n_frames}, "
            f"{resolution}, {distance}"
        )
    v = torch.as_tensor(np.asarray(verts), dtype=torch.float32)
    f = torch.as_tensor(np.asarray(faces), dtype=torch.int64)
    c = torch.as_tensor(np.asarray(vertex_colors), dtype=torch.float32)
    if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] == 0 or f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(
            f"turntable needs a non-empty mesh, got verts {tuple(v.shape)} faces {tuple(f.shape)}"
        )
    if c.shape != v.shape:
        raise ValueError(f"vertex_colors must be {tuple(v.shape)}, got {tuple(c.shape)}")
    if c.numel() and float(c.max()) > 1.0:
        c = c / 255.0  # 8-bit colours, as trimesh stores them
    azimuths = torch.arange(n_frames, dtype=torch.float32) * (360.0 / n_frames)
    frames = []
    with torch.no_grad():
        for chunk in azimuths.split(6):
            imgs = shade_views(v, f, c, chunk, resolution, elevation, distance)
            frames.extend((imgs * 255).round().to(torch.uint8).numpy())
    import imageio.v2 as imageio

    out_path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        imageio.mimsave(out_path, frames, duration=1000.0 / fps, loop=0)
    else:
        imageio.mimsave(out_path, frames, fps=fps)
    return out_path
