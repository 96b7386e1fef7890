"""Isosurface timings vs grid resolution, on a small random MLP field (one object).

Columns: full-grid evaluation (SDF + deformation, no gradients); differentiable extraction
from that grid (library marching cubes + edge bookkeeping + re-evaluation of the surface
corners with gradients); backward of a scalar of the vertices; the two libraries'
marching cubes alone on the same grid; ``renderers.marching``'s torch marching cubes
alone, and the sampler's whole extraction without gradients with each method.

    python bench/isosurface.py [--resolutions 64 96 128 160] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import mcubes
import torch
from skimage.measure import marching_cubes as skimage_marching_cubes
from torch import nn

from renderers.isosurface import evaluate_grid, extract_surface
from renderers.marching import marching_cubes_torch


class MLPField(nn.Module):
    """A sphere of radius 0.5 plus a random MLP bump, and a random MLP deformation; the
    MLPs have the reference decoder's shape (2 hidden layers of 64, no bias)."""

    def __init__(self, seed: int = 0, bound: float = 1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.bound = bound
        self.freq = nn.Parameter(4.0 * torch.randn(3, 32))
        self.sdf_mlp = self._mlp(1)
        self.deform_mlp = self._mlp(3)

    @staticmethod
    def _mlp(n_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(32, 64, bias=False),
            nn.SiLU(),
            nn.Linear(64, 64, bias=False),
            nn.SiLU(),
            nn.Linear(64, n_out, bias=False),
        )

    def _features(self, points):
        return torch.sin(points @ self.freq)

    def sdf(self, points):
        bump = 0.05 * self.sdf_mlp(self._features(points)).squeeze(-1)
        return points.norm(dim=-1) - 0.5 + bump

    def deformation(self, points):
        return self.deform_mlp(self._features(points))


def best_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 96, 128, 160])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    field = MLPField()
    print(f"torch threads {args.threads}, best of {args.repeats}; times in seconds")
    header = (
        f"{'res':>4} {'faces':>7} {'grid':>7} {'extract+grad':>12} {'backward':>8} "
        f"{'skimage':>7} {'mcubes':>7} {'torch':>7} {'sample/skimage':>14} {'sample/torch':>12}"
    )
    print(header)
    for res in args.resolutions:
        t_grid, grid = best_time(lambda r=res: evaluate_grid(field, r, n_objects=1), args.repeats)
        t_ext, meshes = best_time(
            lambda r=res, g=grid: extract_surface(field, r, n_objects=1, grid=g), args.repeats
        )
        mesh = meshes[0]
        t_bwd, _ = best_time(
            lambda m=mesh: m.verts.norm(dim=1).sum().backward(retain_graph=True), args.repeats
        )
        volume = grid[0][0].numpy()
        t_sk, _ = best_time(lambda v=volume: skimage_marching_cubes(v, 0.0), args.repeats)
        t_mc, _ = best_time(lambda v=volume: mcubes.marching_cubes(v, 0.0), args.repeats)
        t_torch, _ = best_time(lambda g=grid: marching_cubes_torch(g[0][0]), args.repeats)
        t_sample = {
            m: best_time(
                lambda r=res, g=grid, m=m: extract_surface(
                    field, r, n_objects=1, grid=g, with_grad=False, method=m
                ),
                args.repeats,
            )[0]
            for m in ("skimage", "torch")
        }
        print(
            f"{res:>4} {len(mesh.faces):>7} {t_grid:>7.3f} {t_ext:>12.3f} {t_bwd:>8.3f} "
            f"{t_sk:>7.3f} {t_mc:>7.3f} {t_torch:>7.3f} {t_sample['skimage']:>14.3f} "
            f"{t_sample['torch']:>12.3f}"
        )


if __name__ == "__main__":
    main()
