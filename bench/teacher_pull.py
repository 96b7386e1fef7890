"""Which way does each teacher pull an object's opacity, given its colour?

A render of the true scene is faded by a in [0, 1] (rgb = a * object + (1 - a) * background,
mask x a; depth and normals as they are) and scored by every teacher of a config; the
derivative dL/da, averaged over --draws timestep / noise draws, says what the teacher asks
of the object's opacity: negative, more of it; positive, remove it (the derivative a
render's density receives in the volume branch has this sign wherever the object is).
With --color the object is painted that colour instead of the prompt's: the colour a
student reaches before its colours follow the prompts. Two uses: a teacher that wants its
own prompt's true object removed is miscalibrated (CFG, loss); one that removes an object
of the wrong colour faster than the colour can follow makes a student's objects vanish.

    python -m bench.teacher_pull --config configs/distill_tiny.yaml [--alphas 0.5 1.0]
        [--color 0.61,0.54,0.42] [--prompts-file F] [--draws 12] [key=value ...]

Prints one row per prompt and alpha: dL/da of every teacher, mean +- standard error, and
for the RGB teachers the mean colour of the object in their guided x0 target (what the
teacher would paint; compare it with the prompt's colour across CFG scales) and, with
--color, the cosine between the way the loss's gradient moves the object's whole colour
and the way to the prompt's colour (+1: straight there; it separates what the target
asks from what reaches the render, e.g. through a latent teacher's VAE encoder). The
teachers score the volume branch's inputs at step 0 of the config's schedules.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from prd.config import load
from prd.model import build_model
from prd.teacher_setup import build_teachers
from prd.train import student_base
from renderers.cameras import sample_cameras
from teachers.base import Views
from teachers.scenes import parse_prompt, render_scenes, scene_color

PROMPTS = (
    "a green sphere",
    "a yellow cube",
    "a purple cylinder",
    "a white cone",
    "a blue torus",
    "a red capsule",
)
"""Default: six training prompts, every shape and every colour once."""


def fade_views(
    render, cams, alpha: torch.Tensor, background: torch.Tensor, shift: torch.Tensor | None = None
) -> Views:
    """The true render with its object faded to ``alpha`` over ``background``; ``shift``
    (3,), when given, is added to the object's colour (weighted by its coverage)."""
    rgb = render.rgb if shift is None else render.rgb + shift * render.mask[..., None]
    rgb = rgb * alpha + (1 - alpha) * background
    return Views(rgb, render.mask * alpha, render.depth, render.normal, cams, len(cams))


@dataclass
class Draw:
    """One teacher call on a faded render."""

    pull: float
    """dL/da: negative, the teacher asks for more of the object; positive, less."""
    target_color: torch.Tensor | None
    """(3,) the object colour of the teacher's guided x0 target (``object_color``)."""
    color_grad: torch.Tensor
    """(3,) dL/d(a shift of the object's whole colour): minus the colour it is pulled to."""


def pull(teacher, render, cams, prompt, background, alpha: float, draws: int, gen) -> list:
    """dL/da of one teacher at one alpha, one value per draw."""
    return [
        d.pull
        for d in pull_and_target(teacher, render, cams, prompt, background, alpha, draws, gen)
    ]


def object_color(image: torch.Tensor, background: torch.Tensor) -> torch.Tensor | None:
    """Mean colour (3,) of an RGB target's (n, h, w, 3) object pixels, those off the
    background by more than 0.15 (summed over channels); None for other targets or none."""
    if image.shape[-1] != 3:
        return None
    off = (image - background).abs().sum(-1) > 0.15
    return image[off].mean(0) if off.any() else None


def pull_and_target(teacher, render, cams, prompt, background, alpha, draws, gen) -> list[Draw]:
    """One ``Draw`` per timestep / noise draw."""
    out = []
    for _ in range(draws):
        a = torch.tensor(alpha, requires_grad=True)
        shift = torch.zeros(3, requires_grad=True)
        views = fade_views(render, cams, a, background, shift)
        g = teacher.for_branch("volume")(views, [prompt], 0, gen)
        d, dc = torch.autograd.grad(g.loss, (a, shift), allow_unused=True)  # ND-MV: no colour
        dc = torch.zeros(3) if dc is None else dc
        out.append(Draw(d.item(), object_color(g.to_image(g.x0), background), dc))
    return out


def cpu_teachers(cfg, model) -> list:
    """The config's teachers on the CPU, the SD teacher sharing ``model``'s student base."""
    cpu = torch.device("cpu")
    return build_teachers(
        cfg.teachers,
        cfg.train.background,
        cfg.cameras.n_views,
        device=cpu,
        student=student_base(model, cfg, None, cpu),
    )


def color_pull_cosine(draws: list[Draw], painted: torch.Tensor, wanted: torch.Tensor):
    """Cosine between the mean colour pull (-dL/dshift) and the way from the painted colour
    to the prompt's; None when the object is painted the prompt's colour."""
    way = wanted - painted
    if way.norm() < 1e-3:
        return None
    pull_ = -torch.stack([d.color_grad for d in draws]).mean(0)
    return torch.nn.functional.cosine_similarity(pull_, way, dim=0).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--color", default=None, help="r,g,b in [0, 1] instead of the prompt's")
    p.add_argument("--prompts-file", default=None, help="default: PROMPTS")
    p.add_argument("--draws", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load(args.config or ["configs/distill_tiny.yaml"], args.overrides)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        prompts = list(PROMPTS)
    teachers = cpu_teachers(cfg, build_model(cfg, seed=cfg.train.seed))
    background = torch.tensor(cfg.train.background)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for prompt in prompts:
        shape = parse_prompt(prompt)[1]
        color = scene_color(prompt)
        if args.color:
            color = torch.tensor([float(x) for x in args.color.split(",")])
        cams = sample_cameras(1, cfg.cameras, gen)
        n = cfg.cameras.n_views
        render = render_scenes(
            [shape] * n, color[None].expand(n, 3), cams, 32, tuple(background.tolist()), 2
        )
        wanted = scene_color(prompt)
        for alpha in args.alphas:
            row = {"prompt": prompt, "alpha": alpha, "color": [round(c, 3) for c in color.tolist()]}
            cells = []
            for teacher in teachers:
                draws = pull_and_target(
                    teacher, render, cams, prompt, background, alpha, args.draws, gen
                )
                d = torch.tensor([x.pull for x in draws])
                se = (d.std() / len(d) ** 0.5).item() if len(d) > 1 else 0.0
                row[teacher.name] = [round(d.mean().item(), 3), round(se, 3)]
                cells.append(f"{teacher.name} {d.mean().item():+9.3g} +- {se:.2g}")
                colors = [x.target_color for x in draws if x.target_color is not None]
                if colors:
                    target = torch.stack(colors).mean(0).tolist()
                    row[teacher.name + "_target_color"] = [round(c, 3) for c in target]
                    cells[-1] += " (target " + ",".join(f"{c:.2f}" for c in target)
                    cos = color_pull_cosine(draws, color, wanted)
                    if cos is not None:
                        row[teacher.name + "_color_pull_cos"] = round(cos, 3)
                        cells[-1] += f"; colour pull cos {cos:+.2f}"
                    cells[-1] += ")"
            rows.append(row)
            print(f"{prompt:20s} a={alpha:.2f}  " + "  ".join(cells), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
