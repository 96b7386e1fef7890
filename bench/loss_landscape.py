"""Where is each teacher's loss lowest? The exact scenes, scaled, through both branches.

The analytic SDF of each prompt's shape is scaled by s (sdf_s(p) = s * sdf(p / s)) and
rendered by the training branches (NeuS patch render; marching cubes + rasterizer) at the
config's cameras and sizes; each teacher scores both renders as in training. A loss that
is lowest at s = 1 is unbiased for the scale of the shape; how fast it rises away from 1
is how sharply that branch tells the student the shape's size. Means over --seeds camera
and noise draws, at training step --step.

    python -m bench.loss_landscape [--config configs/oracle.yaml] [--shapes cube,torus]
                                   [--scales 0.9,0.95,1,1.05,1.1] [key=value ...]
"""

from __future__ import annotations

import argparse

import torch

from prd.branches import mesh_branch, volume_branch
from prd.config import load
from prd.teacher_setup import build_teachers
from renderers.cameras import sample_cameras
from teachers.scenes import OracleField


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--shapes", default="sphere,cube,cylinder,cone,torus,capsule")
    p.add_argument("--scales", default="0.85,0.9,0.95,1.0,1.05,1.1,1.15")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--step", type=int, default=0, help="training step (timestep schedules)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load(args.config or ["configs/oracle.yaml"], args.overrides)
    prompts = [f"a red {s}" for s in args.shapes.split(",")]
    background = torch.tensor(cfg.train.background)
    views = cfg.cameras.n_views
    teachers = build_teachers(cfg.teachers, cfg.train.background, views)
    print(f"{len(prompts)} shapes, {args.seeds} draws; mean teacher loss per branch")
    for scale in (float(s) for s in args.scales.split(",")):
        field = OracleField(prompts, cfg.field.bound, scale=scale)
        totals: dict[str, float] = {}
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(seed)
            cams = sample_cameras(len(prompts), cfg.cameras, gen)
            renders = {
                "volume": volume_branch(field, cams, cfg.volume, views, gen, background, 1.0),
                "mesh": mesh_branch(field, cams, cfg.mesh, cfg.mesh_grid, background),
            }
            for branch, out in renders.items():
                for role in teachers:
                    noise = torch.Generator().manual_seed(seed)
                    loss = role.for_branch(branch)(out.views, prompts, args.step, noise).loss
                    key = f"{role.name}/{branch}"
                    totals[key] = totals.get(key, 0.0) + loss.item() / args.seeds
        print(f"s={scale:.2f}  " + "  ".join(f"{k} {v:8.2f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
