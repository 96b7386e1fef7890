"""Forward + backward time per view of the torch raster backend on this device.

Per (resolution, triangle count): rasterize an icosphere (from 4 views at once, as the
training loop does), interpolate a 3-channel attribute, antialias, and backpropagate the
image sum to the vertices. Prints milliseconds per view. ``--quick`` runs a subset.
"""

from __future__ import annotations

import argparse
import time

import torch
import trimesh

from renderers.cameras import orbit_cameras, world_to_clip
from renderers.raster import TorchRaster

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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="resolutions 64-256, 1k-10k faces")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
