"""Time breakdown of one training step's parts (one progressive step k, then x K).

    python -m bench.train_step --config configs/oracle.yaml [--step N] [key=value ...]

Times, on the current device, with one torch thread unless --threads: text encoding,
student UNet + x0, VAE decode, volume branch, mesh branch, each teacher per branch,
backward, and the optimizer step; plus the total of K progressive steps. The eikonal and
sparsity terms enter with their ramps' weights at training step --step, as in the loop
(``prd.train.regularization``: a term whose weight is 0 is left out).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from prd.branches import mesh_branch, volume_branch
from prd.config import load
from prd.model import build_model
from prd.progressive import progressive_timesteps
from prd.teacher_setup import build_teachers
from prd.train import make_optimizer, regularization
from renderers.cameras import sample_cameras


class Clock:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=["configs/oracle.yaml"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--step", type=int, default=0, help="training step of the ramps' weights")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load(args.config[-1:], args.overrides)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model(cfg)
    teachers = build_teachers(cfg.teachers, cfg.train.background, cfg.cameras.n_views)
    opt = make_optimizer(cfg, [q for q in model.parameters() if q.requires_grad])
    background = torch.tensor(cfg.train.background)
    b, planes = cfg.train.batch_size, cfg.student.planes
    size = cfg.student.resolved_latent_size()
    prompts = cfg.prompts.resolve()[:b]
    results = []
    for _ in range(args.repeats):
        clock = Clock()
        text = clock("text_encode", model.student.encode_text, prompts)
        t_k = progressive_timesteps(cfg.train.progressive_steps)[0]
        z = torch.randn(b * planes, 4, size, size, generator=gen)
        t = torch.full((b * planes,), t_k, dtype=torch.long)
        x0 = clock("student_unet", model.student.predict_x0, z, t, text)
        geo, tex = clock("vae_decode", model.student.decode, x0)
        field = model.field(geo, tex)
        cams = sample_cameras(b, cfg.cameras, gen)
        branches = {
            "volume": clock(
                "volume_branch",
                volume_branch,
                field,
                cams,
                cfg.volume,
                cfg.cameras.n_views,
                gen,
                background,
                1.0,
            )
        }
        if cfg.mesh.enabled:
            branches["mesh"] = clock(
                "mesh_branch", mesh_branch, field, cams, cfg.mesh, cfg.mesh_grid, background
            )
        loss = regularization(branches["volume"].regularizers, cfg.train, args.step)
        for branch, out in branches.items():
            for teacher in teachers:
                g = clock(
                    f"teacher_{teacher.name}_{branch}",
                    teacher.for_branch(branch),
                    out.views,
                    prompts,
                    0,
                    gen,
                )
                loss = loss + g.loss
        clock("backward", loss.backward)
        clock("optimizer", opt.step)
        opt.zero_grad(set_to_none=True)
        one = sum(clock.times.values())
        clock.times["one_progressive_step"] = one
        clock.times["step_estimate_K"] = one * cfg.train.progressive_steps
        results.append(clock.times)
    best = {k: min(r[k] for r in results) for k in results[0]}
    print(json.dumps({k: round(v, 4) for k, v in best.items()}, indent=1))


if __name__ == "__main__":
    main()
