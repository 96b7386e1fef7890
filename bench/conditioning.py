"""How fast can the student learn prompt-dependent triplanes? A probe without renderers.

The oracle scenes' exact 3D answer supervises the student's field directly: the SDF at
uniform points of the field cube (clamped to +-0.2) and the albedo at surface points.
No teacher, no rendering: a step costs ~0.1 s a prompt instead of ~1 s, so the student's
*conditioning* (text -> planes) can be measured apart from the distillation around it.

Two paths into the VAE decoder, each then the field MLPs:
  student   text -> UNet at t = 999 from fresh noise -> x0 latents (one progressive step)
  latents   one free latent per prompt (learning rate --latent-lr): the decoder and the
            field alone, i.e. the best a text pathway could hand them

Every --every steps it prints, over the 30 training prompts (fixed noise): the colour
error at surface points (L2 in RGB; the vocabulary's mean colour scores ~0.63) and the
mean |SDF| on the true surface.

With configs/oracle.yaml the student starts from the pretrained tiny base in
runs/tiny_base (``prd tiny-base --out runs/tiny_base``); the random-init student of
earlier defaults is ``student.pretrained=null student.train_base=true
student.denoiser_skip=true``.

    python -m bench.conditioning [--path student|latents] [--batch 6] [--steps 120]
                                 [--config configs/oracle.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from prd.config import load
from prd.model import build_model
from teachers.scenes import TRAIN_PROMPTS, sample_surface, scene_color, scene_sdf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--path", choices=("student", "latents"), default="student")
    p.add_argument("--batch", type=int, default=6, help="prompts per optimizer step")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--latent-lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load(args.config or ["configs/oracle.yaml"], args.overrides)
    model = build_model(cfg, seed=cfg.train.seed)
    prompts = list(TRAIN_PROMPTS)
    n, size, planes = len(prompts), cfg.student.resolved_latent_size(), cfg.student.planes
    gen = torch.Generator().manual_seed(cfg.train.seed)
    text = model.student.encode_text(prompts)
    surface = torch.stack([sample_surface(q, 512, gen)[0] for q in prompts])  # (n, 512, 3)
    colors = torch.stack([scene_color(q) for q in prompts])[:, None]  # (n, 1, 3)
    groups = [{"params": [q for q in model.parameters() if q.requires_grad]}]
    latents = None
    if args.path == "latents":
        latents = torch.nn.Parameter(torch.randn(n * planes, 4, size, size, generator=gen))
        groups.append({"params": [latents], "lr": args.latent_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=0.0)
    t999 = model.student.alphas_cumprod.numel() - 1

    def field_of(idx: list[int], noise_gen: torch.Generator):
        if latents is not None:
            rows = torch.tensor([i * planes + j for i in idx for j in range(planes)])
            geometry, texture = model.student.decode(latents[rows])
        else:
            z = torch.randn(len(idx) * planes, 4, size, size, generator=noise_gen)
            t = torch.full((len(idx) * planes,), t999)
            _, geometry, texture = model(z, t, text[idx])
        return model.field(geometry, texture)

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            field = field_of(list(range(n)), torch.Generator().manual_seed(123))
            err = (field.color(surface) - colors).norm(dim=-1).mean().item()
            return err, field.sdf(surface).abs().mean().item()

    print(f"path {args.path}, {args.batch} prompts a step, lr {cfg.train.lr}")
    print(f"{'step':>5} {'colour_err':>10} {'surface|sdf|':>12} {'seconds':>8}")
    order: list[int] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        while len(order) < args.batch:  # epochs of shuffled prompts
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[: args.batch], order[args.batch :]
        field = field_of(idx, gen)
        pts = (torch.rand(len(idx), 1024, 3, generator=gen) * 2 - 1) * cfg.field.bound
        true_sdf = torch.stack([scene_sdf(prompts[i])(pts[j]) for j, i in enumerate(idx)])
        sdf_err = (field.sdf(pts) - true_sdf).clamp(-0.2, 0.2)
        color_err = field.color(surface[idx, :256]) - colors[idx]
        loss = 100 * sdf_err.square().mean() + 10 * color_err.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            err, sdf = evaluate()
            print(f"{step:>5} {err:>10.3f} {sdf:>12.4f} {time.perf_counter() - start:>8.0f}")


if __name__ == "__main__":
    main()
