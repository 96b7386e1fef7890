"""Forward + backward time per view of the torch raster backend on this device.

Per (resolution, triangle count): rasterize an icosphere (from 4 views at once, as the
training loop does), interpolate a 3-channel attribute, antialias, and backpropagate the
image sum to the vertices. Prints milliseconds per view. ``--quick`` runs a subset.

``--accuracy`` instead prints, per edge angle, how the antialiased mask of a half-plane
(a straight edge across a 48 x 96 image) compares with the exact box-filtered coverage:
the error of the summed coverage (the quantity whose gradient antialias provides) and the
largest and mean per-pixel errors over the pixels the edge touches.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import trimesh

from renderers.cameras import orbit_cameras, world_to_clip
from renderers.raster import TorchRaster, antialias, rasterize

FACE_COUNTS = (1_000, 10_000, 100_000)


def sphere_with_faces(n_faces: int):
    """An icosphere of radius 0.5 (20 * 4^s faces) cut to its first n_faces faces."""
    sub = 0
    while 20 * 4**sub < n_faces:
        sub += 1
    m = trimesh.creation.icosphere(subdivisions=sub, radius=0.5)
    verts = torch.tensor(m.vertices, dtype=torch.float32)
    faces = torch.tensor(m.faces[:n_faces], dtype=torch.int32)
    return verts, faces


def time_one(raster, verts, faces, resolution, n_views, repeats):
    cams = orbit_cameras(torch.arange(n_views) * (360.0 / n_views), 20.0, 1.5, 60.0)
    mvp = world_to_clip(cams)
    colour = torch.rand(verts.shape[0], 3)
    best = float("inf")
    for _ in range(repeats):
        v = verts.clone().requires_grad_(True)
        start = time.perf_counter()
        pos = torch.cat([v, torch.ones_like(v[:, :1])], 1) @ mvp.transpose(1, 2)
        rast, _ = raster.rasterize(pos, faces, (resolution, resolution))
        img, _ = raster.interpolate(colour, rast, faces)
        img = raster.antialias(img, rast, pos, faces)
        img.sum().backward()
        best = min(best, time.perf_counter() - start)
    return best / n_views


def half_plane_accuracy(theta_deg: float, offset: float = 0.137, sub: int = 512):
    """(summed coverage error in pixels, max and mean |per-pixel error| on edge pixels)
    for an edge at theta_deg (not a multiple of 90) through the image centre."""
    th = math.radians(theta_deg)
    u = (math.cos(th), math.sin(th))
    steep = abs(u[1]) >= abs(u[0]) - 1e-12  # 45 degrees: horizontal pairs, as antialias
    height, width = (48, 96) if steep else (96, 48)
    n = (u[1], -u[0])  # the covered side is n . p < c, in pixel-corner coordinates
    cx, cy = width / 2 + offset * n[0], height / 2 + offset * n[1]
    c = n[0] * cx + n[1] * cy
    far = [(cx - 200 * u[0], cy - 200 * u[1]), (cx + 200 * u[0], cy + 200 * u[1])]
    far.append((cx - 400 * n[0], cy - 400 * n[1]))
    xy = torch.tensor(far, dtype=torch.float64) / torch.tensor([width / 2, height / 2]) - 1
    pos = torch.cat([xy, torch.zeros(3, 1), torch.ones(3, 1)], 1).float()
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast, _ = rasterize(pos, tri, (height, width))
    aa = antialias((rast[..., 3:] > 0).float(), rast, pos, tri)[0, ..., 0].double()
    # Exact coverage: per sub-column x of a pixel, the covered part of [row, row + 1] is a
    # clamped linear function of the edge's height there.
    xs = (torch.arange(width * sub, dtype=torch.float64) + 0.5) / sub
    y_edge = (c - n[0] * xs) / n[1]
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    part = (y_edge - rows) if n[1] > 0 else (rows + 1 - y_edge)
    exact = part.clamp(0, 1).view(height, width, sub).mean(-1)
    edge = (exact > 0) & (exact < 1) | (aa != exact.round())
    err = (aa - exact)[edge].abs()
    return (aa.sum() - exact.sum()).item(), err.max().item(), err.mean().item()


def accuracy_table():
    print("half-plane edge at angle: summed coverage error (px), per-pixel |error| on edge")
    print(f"{'angle':>6} {'sum err':>10} {'max':>7} {'mean':>7}")
    for angle in (5, 10, 20, 30, 40, 45, 50, 60, 70, 80, 85, 120, 165):
        total, worst, mean = half_plane_accuracy(float(angle))
        print(f"{angle:>6} {total:>10.2e} {worst:>7.3f} {mean:>7.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="resolutions 64-256, 1k-10k faces")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--accuracy", action="store_true", help="per-angle coverage errors")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.accuracy:
        accuracy_table()
        return
    resolutions = (64, 128, 256) if args.quick else (64, 128, 256, 512)
    counts = FACE_COUNTS[:2] if args.quick else FACE_COUNTS
    raster = TorchRaster()
    print(f"torch backend, CPU, {args.threads} thread(s), {args.views} views per call")
    print("ms per view (forward + backward)")
    print("faces    " + "".join(f"{r:>10d}" for r in resolutions))
    for n in counts:
        verts, faces = sphere_with_faces(n)
        row = [time_one(raster, verts, faces, r, args.views, args.repeats) for r in resolutions]
        print(f"{n:<9d}" + "".join(f"{1000 * t:>10.1f}" for t in row))


if __name__ == "__main__":
    main()
