"""Time and memory of the NeuS patch render (the training path) on CPU.

Per object: 4 views, each a 40x40 full-resolution patch + a 42x42 global grid, 128 + 64
samples per ray, forward with the differentiable SDF gradient (create_graph) and backward
of a loss using colour, opacity, normals and the eikonal term. Fields: a tiny MLP on
positions (default) or the student's triplane field at its real plane size.

    python bench/volume.py [--field mlp|triplane] [--objects 1] [--views 4] [--repeats 3]
                           [--threads 1] [--color-min-weight 0]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from torch import nn

from renderers.cameras import CameraSampling, sample_cameras
from renderers.volume import VolumeConfig, render_views


class MLPField(nn.Module):
    """B copies of one small MLP on raw positions; SDF = MLP + sphere of radius 0.5."""

    def __init__(self, n_objects: int, hidden: int = 64, bound: float = 1.0):
        super().__init__()
        self.bound, self.n_objects = bound, n_objects
        act = lambda: nn.Softplus(beta=100)
        self.sdf_net = nn.Sequential(
            nn.Linear(3, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, 1)
        )
        self.rgb_net = nn.Sequential(
            nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 3), nn.Sigmoid(),
        )  # fmt: skip

    def sdf(self, points):
        return self.sdf_net(points)[..., 0] + points.norm(dim=-1) - 0.5

    def color(self, points):
        return self.rgb_net(points)

    def deformation(self, points):
        return torch.zeros_like(points)


def triplane_field(n_objects: int):
    from prd.triplane import FieldConfig, FieldDecoder

    cfg = FieldConfig()
    decoder = FieldDecoder(cfg)
    geometry = torch.randn(n_objects, 3, cfg.channels, 256, 256, requires_grad=True)
    texture = torch.randn(n_objects, 3, cfg.channels, 256, 256, requires_grad=True)
    return decoder.bind(0.01 * geometry, 0.01 * texture), [geometry, *decoder.parameters()]


def colored_share(field, cfg, sampling, gen, n_objects: int) -> float:
    """Share of samples whose colour is evaluated (weights above color_min_weight)."""
    if cfg.color_min_weight <= 0:
        return 1.0
    cams = sample_cameras(n_objects, sampling, generator=gen)
    with torch.no_grad():
        out = render_views(field, cams, cfg, sampling.n_views, generator=gen, mode="patch")
    return float((out.rays.weights > cfg.color_min_weight).float().mean())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--field", choices=("mlp", "triplane"), default="mlp")
    ap.add_argument("--objects", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--color-min-weight", type=float, default=0.0)
    ap.add_argument("--views", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.field == "mlp":
        field = MLPField(args.objects)
        params = list(field.parameters())
    else:
        field, params = triplane_field(args.objects)
    cfg = VolumeConfig(color_min_weight=args.color_min_weight)
    sampling = CameraSampling(n_views=args.views)
    gen = torch.Generator().manual_seed(0)
    rss_before = peak_rss_mib()

    def step():
        cams = sample_cameras(args.objects, sampling, generator=gen)
        t0 = time.perf_counter()
        out = render_views(field, cams, cfg, sampling.n_views, generator=gen, mode="patch")
        t1 = time.perf_counter()
        rays = out.rays
        eikonal = ((rays.grad_norm - 1) ** 2)[rays.ray_valid].mean()
        loss = (
            out.images.rgb.mean()
            + out.coarse.rgb.mean()
            + out.images.normal.square().mean()
            + rays.opacity.mean()
            + eikonal
        )
        loss.backward()
        t2 = time.perf_counter()
        for p in params:
            p.grad = None
        return t1 - t0, t2 - t1

    with torch.no_grad():
        cams = sample_cameras(args.objects, sampling, generator=gen)
        t0 = time.perf_counter()
        render_views(field, cams, cfg, sampling.n_views, generator=gen, mode="patch")
        no_grad = time.perf_counter() - t0
    times = [step() for _ in range(args.repeats)]
    fwd = min(t[0] for t in times)
    bwd = min(t[1] for t in times)
    rays = args.objects * sampling.n_views * (cfg.patch_size**2 + cfg.global_size**2)
    print(
        json.dumps(
            {
                "field": args.field,
                "objects": args.objects,
                "views_per_object": sampling.n_views,
                "rays": rays,
                "samples_per_ray": cfg.n_uniform + cfg.n_importance,
                "threads": args.threads,
                "color_min_weight": cfg.color_min_weight,
                "colored_sample_share": round(
                    colored_share(field, cfg, sampling, gen, args.objects), 3
                ),
                "forward_no_grad_s": round(no_grad, 3),
                "forward_s": round(fwd, 3),
                "backward_s": round(bwd, 3),
                "forward_backward_s": round(fwd + bwd, 3),
                "peak_rss_mib": round(peak_rss_mib(), 1),
                "peak_rss_increase_mib": round(peak_rss_mib() - rss_before, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
