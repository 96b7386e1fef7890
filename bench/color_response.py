"""How fast does one teacher move the student's colours, prompt by prompt?

The smallest setting in which a teacher has to teach colour: the config's student at its
initial weights, one teacher on the volume branch alone, a few prompts, the config's
optimizer. Each step samples the student's one-step triplanes (t = 999) for the prompts,
renders their views and takes one optimizer step on that teacher's loss. Every --every
steps it prints the field's colour for each prompt (the mean over the four CENTRE
points) and the coverage of its renders (mean opacity; a prompt whose shape is absent or
out of view passes its colour only a faint gradient, through near-zero opacity), and at
the end the distance from the prompt's colour. The start is the same for every prompt
(the initial student is grey), so a teacher whose pull follows the prompt moves the
prompts apart; one that moves them together (towards one colour whatever the prompt)
teaches no colour at all. Without ``--hold richdreamer`` nothing holds the shapes: they
may fade as in no training run, so compare teachers in that setting, not its rates with
training's.

    python -m bench.color_response --config configs/distill_tiny.yaml --teacher sd
        [--steps 20] [--prompts "a green sphere,a red capsule"] [--draws 1]
        [--hold richdreamer] [key=value ...]

Compare, e.g., ``teachers.sd.source=oracle`` (exact targets) with the learned teacher,
and ``teachers.sd.guidance.latent_grad=encoder`` with ``decoder``.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.teacher_pull import cpu_teachers
from prd.branches import volume_branch
from prd.config import Config, load
from prd.model import build_model
from prd.train import make_optimizer
from renderers.cameras import sample_cameras
from teachers.scenes import scene_color

CENTRE = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.1]])
"""Points near the centre where the field's colour is read (it is defined everywhere, on
the surface or not; the initial student's shapes are centred)."""


def field_colors(field, n_prompts: int) -> torch.Tensor:
    """(n_prompts, 3) the field's mean colour at CENTRE for each prompt's planes."""
    with torch.no_grad():
        points = CENTRE[None].expand(n_prompts, -1, -1).contiguous()
        return field.color(points).mean(1)


def respond(
    cfg: Config,
    teacher_name: str,
    prompts: list[str],
    steps: int,
    every: int,
    seed: int = 0,
    draws: int = 1,
    hold: str | None = None,
):
    """[(step, (n_prompts, 3) field colours, (n_prompts,) coverage)] every ``every`` steps
    and at the end; coverage is the mean opacity of each prompt's renders at that step (0:
    no surface in view, so no colour gradient of its own). Each step's loss is the mean
    of ``draws`` teacher calls (timestep and noise draws); ``hold`` names a second teacher
    (e.g. "richdreamer") whose loss on the same views is added, to hold the shapes as in
    training."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    model = build_model(cfg, seed=seed)
    teachers = cpu_teachers(cfg, model)
    names = [t.name for t in teachers]
    for name in (teacher_name, hold):
        if name is not None and name not in names:
            raise ValueError(f"no enabled teacher {name!r} in the config (have {names})")
    teacher = teachers[names.index(teacher_name)].for_branch("volume")
    holder = teachers[names.index(hold)].for_branch("volume") if hold else None
    student = model.student
    opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    gen = torch.Generator().manual_seed(seed)
    text = student.encode_text(prompts)
    size, planes = student.cfg.resolved_latent_size(), student.cfg.planes
    background = torch.tensor(cfg.train.background)
    history = []
    for step in range(steps + 1):
        z = torch.randn(len(prompts) * planes, 4, size, size, generator=gen)
        t = torch.full((len(z),), 999, dtype=torch.long)
        field = model.field(*student.decode(student.predict_x0(z, t, text)))
        cams = sample_cameras(len(prompts), cfg.cameras, gen)
        views = volume_branch(
            field, cams, cfg.volume, cfg.cameras.n_views, gen, background, 1.0
        ).views
        if step % every == 0 or step == steps:
            colors = field_colors(field, len(prompts))
            coverage = views.mask.detach().reshape(len(prompts), -1).mean(1)
            history.append((step, colors, coverage))
        if step == steps:
            break
        loss = sum(teacher(views, prompts, step, gen).loss for _ in range(draws)) / draws
        if holder is not None:
            loss = loss + holder(views, prompts, step, gen).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--teacher", default="sd")
    p.add_argument("--prompts", default="a green sphere,a red capsule", help="comma-separated")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=1, help="teacher calls averaged per step")
    p.add_argument("--hold", default=None, help="a second teacher that holds the shapes")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load(args.config or ["configs/distill_tiny.yaml"], args.overrides)
    prompts = [q.strip() for q in args.prompts.split(",") if q.strip()]
    history = respond(
        cfg, args.teacher, prompts, args.steps, args.every, args.seed, args.draws, args.hold
    )
    fmt = lambda c: "(" + ", ".join(f"{x:.2f}" for x in c.tolist()) + ")"  # noqa: E731
    for step, colors, coverage in history:
        cells = [f"{q}: {fmt(c)} cover {a:.3f}" for q, c, a in zip(prompts, colors, coverage)]
        print(f"step {step:4d}  " + "  ".join(cells))
    final = history[-1][1]
    errors = [(c - scene_color(q)).norm().item() for q, c in zip(prompts, final)]
    print("colour error at the end: " + "  ".join(f"{q}: {e:.3f}" for q, e in zip(prompts, errors)))
    if args.json:
        rows = {"prompts": prompts, "errors": errors,
                "history": [[s, c.tolist(), a.tolist()] for s, c, a in history]}  # fmt: skip
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
