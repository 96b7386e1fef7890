"""How well do the learned tiny teachers sample the oracle scenes? (``prd tiny-teachers``)

Each teacher is loaded as a run loads it (``prd.tiny_teachers.load_teachers``: the
original-layout files through ``load_denoiser``), then samples ``--sets`` fresh 4-view
camera sets of every vocabulary prompt (seeded, drawn apart from the training cameras)
by ``--steps``-step DDIM from noise with classifier-free guidance ``--cfg``. The samples
are compared with the true renders of the same cameras, per prompt group: the 30
training prompts and the 6 held-out ones (never rendered while training).

MVDream (latents decoded by the tiny VAE, RGB in [0, 1]):
  mae       mean |sample - truth| over pixels and channels
  colour    L2 between the mean colour of the sample's object pixels (off the grey
            background by > 0.15 summed) and the prompt's colour
  iou       those object pixels against the true mask (> 0.5)
  nearest   share of sets whose nearest (MSE) of all 36 scenes' renders from the same
            cameras is the prompt's own; colour / shape: its colour / shape is right
ND-MV (4 channels in [-1, 1], as the role packs them; pixel space, so each step's x0
estimate is clamped to [-1, 1] as ldm samples pixel-space models):
  mae       mean |sample - truth| over pixels and channels
  iou       object pixels (depth channel > -0.8; background is -1) against the true mask
  normal    mean angle (degrees) between sampled and true normals where both see the object
  depth     mean |depth channel error| on the true object pixels
  nearest   share of sets whose nearest of the 6 shapes' renders is the prompt's shape
  x0@t      mean |x0 estimate - truth| of one conditional eps call on the true views
            noised to t (what distillation asks of a teacher), under the prompt / under
            the prompt with another shape / under "": right < wrong when the text is used

    python -m bench.tiny_teachers --dir runs/tiny_teachers [--sets 1] [--steps 20]
                                  [--cfg 5] [--teacher mvdream|richdreamer]
                                  [--negative "ugly, ..."]
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from torch import Tensor

from prd.arch import sd_scheduler
from prd.config import load
from prd.tiny_teachers import BACKGROUND, NUM_FRAMES, load_teachers, read_manifest
from renderers.cameras import Cameras, CameraSampling, sample_cameras
from teachers.base import Views
from teachers.noise import NoiseSchedule
from teachers.roles import MultiViewNormalDepth
from teachers.scenes import (
    ALL_PROMPTS,
    COLORS,
    HELDOUT_PROMPTS,
    SHAPES,
    TRAIN_PROMPTS,
    parse_prompt,
    render_scenes,
)


@torch.no_grad()
def ddim_sample(
    denoiser,
    prompts: list[str],
    cameras: Cameras,
    shape,
    steps: int,
    cfg: float,
    gen,
    clip: bool = False,
    negative: str = "",
) -> Tensor:
    """x0 (len(prompts) * 4, *shape) sampled by DDIM (eta 0) with CFG from N(0, I): one
    prompt per 4-view set, cameras (len(prompts) * 4) of those sets; ``negative``: the
    prompt of CFG's other branch. clip: clamp each step's x0 estimate to [-1, 1] (ldm's
    sampling of pixel-space models)."""
    sched = DDIMScheduler.from_config(sd_scheduler().config, clip_sample=clip)
    sched.set_timesteps(steps)
    per_view = [p for p in prompts for _ in range(NUM_FRAMES)]
    text = denoiser.encode_text(per_view + [negative] * len(per_view))
    both = Cameras.cat([cameras, cameras])
    x = torch.randn(len(per_view), *shape, generator=gen)
    for t in sched.timesteps:
        tt = torch.full((2 * len(x),), int(t))
        eps_c, eps_u = denoiser(torch.cat([x, x]), tt, text, both).chunk(2)
        x = sched.step(eps_u + cfg * (eps_c - eps_u), t, x).prev_sample
    return x


def shape_renders(cameras: Cameras, size: int):
    """{shape: SceneRender} of every vocabulary shape from ``cameras`` in white (colours
    enter affinely: rgb = mask * colour + (1 - mask) * background)."""
    white = torch.ones(len(cameras), 3)
    return {
        s: render_scenes([s] * len(cameras), white, cameras, size, BACKGROUND, supersample=2)
        for s in SHAPES
    }


def sets_mse(a: Tensor, b: Tensor) -> Tensor:
    """(n_sets * 4, ...) x2 -> (n_sets,) mean squared difference over each set."""
    return (a - b).square().reshape(-1, NUM_FRAMES * a[0].numel()).mean(1)


def rgb_metrics(img: Tensor, prompts: list[str], renders) -> dict:
    """img (n_sets * 4, h, w, 3) in [0, 1]; renders: ``shape_renders`` of its cameras."""
    bg = torch.tensor(BACKGROUND)
    colours = {c: torch.tensor(v) for c, v in COLORS.items()}
    truth_of = lambda s, c: renders[s].mask[..., None] * (colours[c] - bg) + bg
    scenes = [parse_prompt(p) for p in ALL_PROMPTS]
    dist = torch.stack([sets_mse(img, truth_of(s, c)) for c, s in scenes], 1)  # (n_sets, 36)
    nearest = [scenes[i] for i in dist.argmin(1).tolist()]
    own = [parse_prompt(p) for p in prompts]
    truth = torch.stack([truth_of(s, c)[i * 4 : i * 4 + 4] for i, (c, s) in enumerate(own)])
    mask = torch.stack([renders[s].mask[i * 4 : i * 4 + 4] for i, (_, s) in enumerate(own)])
    truth, mask = truth.flatten(0, 1), mask.flatten(0, 1) > 0.5
    fg = (img - bg).abs().sum(-1) > 0.15
    mean = (img * fg[..., None]).reshape(-1, 4, *img.shape[1:]).sum((1, 2, 3))
    mean = mean / fg.reshape(-1, 4, *fg.shape[1:]).sum((1, 2, 3)).clamp_min(1)[:, None]
    want = torch.stack([colours[c] for c, _ in own])
    return dict(
        mae=(img - truth).abs().mean().item(),
        colour=(mean - want).norm(dim=-1).mean().item(),
        iou=((fg & mask).sum() / (fg | mask).sum().clamp_min(1)).item(),
        nearest=sum(n == o for n, o in zip(nearest, own)) / len(own),
        nearest_colour=sum(n[0] == o[0] for n, o in zip(nearest, own)) / len(own),
        nearest_shape=sum(n[1] == o[1] for n, o in zip(nearest, own)) / len(own),
    )


def nd_metrics(x: Tensor, prompts: list[str], renders, cameras: Cameras, radius: float) -> dict:
    """x (n_sets * 4, 4, h, w) packed normal + depth; renders of ``cameras`` by shape."""
    role = MultiViewNormalDepth(NUM_FRAMES, radius=radius)
    size = x.shape[-1]
    pack = lambda r: role.encode(Views(r.rgb, r.mask, r.depth, r.normal, cameras, 4), size)
    packed = {s: pack(r) for s, r in renders.items()}
    dist = torch.stack([sets_mse(x, packed[s]) for s in SHAPES], 1)  # (n_sets, 6)
    own = [parse_prompt(p)[1] for p in prompts]
    rows = lambda i: slice(i * 4, i * 4 + 4)
    truth = torch.cat([packed[s][rows(i)] for i, s in enumerate(own)])
    mask = torch.cat([renders[s].mask[rows(i)] for i, s in enumerate(own)]) > 0.5
    fg = x[:, 3] > -0.8
    both = fg & mask
    cos = torch.nn.functional.cosine_similarity(x[:, :3], truth[:, :3], dim=1).clamp(-1, 1)
    return dict(
        mae=(x - truth).abs().mean().item(),
        iou=((fg & mask).sum() / (fg | mask).sum().clamp_min(1)).item(),
        normal=torch.rad2deg(torch.acos(cos[both])).mean().item(),
        depth=(x[:, 3] - truth[:, 3]).abs()[mask].mean().item(),
        nearest=sum(SHAPES[i] == s for i, s in zip(dist.argmin(1).tolist(), own)) / len(own),
    )


@torch.no_grad()
def one_step_x0(denoiser, truth: Tensor, prompts: list[str], cameras: Cameras, t: int) -> list:
    """[right, wrong, empty]: mean |x0 - truth| of the one-step x0 estimate from ``truth``
    (n_sets * 4, C, h, w) noised to ``t`` (fixed noise), conditioned on each set's prompt,
    on it with the shape three places on in ``SHAPES``, and on ""."""
    sched = NoiseSchedule()
    other = lambda c, s: f"a {c} {SHAPES[(SHAPES.index(s) + 3) % len(SHAPES)]}"
    wrong = [other(*parse_prompt(p)) for p in prompts]
    tt = torch.full((len(truth),), t)
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(t))
    x_t = sched.add_noise(truth, noise, tt)
    out = []
    for texts in (prompts, wrong, [""] * len(prompts)):
        text = denoiser.encode_text([q for q in texts for _ in range(NUM_FRAMES)])
        x0 = sched.x0_from_eps(x_t, denoiser(x_t, tt, text, cameras), tt).clamp(-1, 1)
        out.append((x0 - truth).abs().mean().item())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="a `prd tiny-teachers` folder")
    p.add_argument("--config", action="append", default=None, help="cameras (default oracle)")
    p.add_argument("--teacher", choices=("mvdream", "richdreamer"), action="append")
    p.add_argument("--sets", type=int, default=1, help="4-view sets per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument(
        "--negative", default="", help="CFG's negative prompt (distill_tiny.yaml: the reference's)"
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cameras: CameraSampling = load(args.config or ["configs/oracle.yaml"], []).cameras
    info = read_manifest(args.dir)
    teachers = load_teachers(args.dir)
    vae = AutoencoderKL.from_pretrained(f"{args.dir}/{info['mvdream']['vae']}", subfolder="vae")
    groups = {"train": list(TRAIN_PROMPTS), "held-out": list(HELDOUT_PROMPTS)}
    print(f"{args.dir}: {args.sets} set(s) of 4 views a prompt, {args.steps}-step DDIM, "
          f"CFG {args.cfg}")  # fmt: skip
    for name in args.teacher or ("mvdream", "richdreamer"):
        spec, denoiser = info[name], teachers[name]
        size = spec["resolution"]
        for group, prompts in groups.items():
            start = time.perf_counter()
            prompts = [q for q in prompts for _ in range(args.sets)]
            gen = torch.Generator().manual_seed(args.seed)
            cams = sample_cameras(len(prompts), cameras, gen)
            renders = shape_renders(cams, size)
            if name == "mvdream":
                lat = (vae.config.latent_channels, size // 4, size // 4)
                z = ddim_sample(
                    denoiser, prompts, cams, lat, args.steps, args.cfg, gen, negative=args.negative
                )
                with torch.no_grad():
                    img = vae.decode(z / spec["scaling_factor"]).sample
                img = ((img.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
                m = rgb_metrics(img, prompts, renders)
            else:
                x = ddim_sample(
                    denoiser, prompts, cams, (4, size, size), args.steps, args.cfg, gen, True,
                    args.negative,
                )  # fmt: skip
                m = nd_metrics(x.clamp(-1, 1), prompts, renders, cams, spec["depth_radius"])
                role = MultiViewNormalDepth(NUM_FRAMES, radius=spec["depth_radius"])
                own = [parse_prompt(q)[1] for q in prompts]
                truth = torch.cat([
                    role.encode(Views(r.rgb, r.mask, r.depth, r.normal, cams, 4), size)[
                        i * 4 : i * 4 + 4
                    ]
                    for i, r in enumerate(renders[s] for s in own)
                ])  # fmt: skip
                for t in (200, 500, 800):
                    right, wrong, empty = one_step_x0(denoiser, truth, prompts, cams, t)
                    m[f"x0@{t}"] = f"{right:.3f}/{wrong:.3f}/{empty:.3f}"
            numbers = "  ".join(
                f"{k} {v if isinstance(v, str) else f'{v:.3f}'}" for k, v in m.items()
            )
            print(f"{name:<11} {group:<8} {numbers}  ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
