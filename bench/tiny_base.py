"""Pretrain the tiny SD in code on the oracle world's images, as SD 2.1 was on the world's.

A stand-in for the pretrained base the method starts from (the embedded default starts
from random weights instead; ``bench/conditioning.py`` measures what that costs):
  1. images: ``--views`` random training cameras of each of the 30 training scenes
     (32 px, 2x2 supersampled, grey background); no held-out scene is ever shown
  2. VAE of the tiny arch (encoder and decoder): MSE + 1e-5 KL; then SD's convention,
     scaling_factor = 1 / std of the latents
  3. UNet of the tiny arch: epsilon prediction on the scaled latents, conditioned on the
     student's own frozen text encoder (the one ``build_model(cfg, seed=train.seed)``
     builds), 10% empty prompts (for classifier-free guidance)
  4. a diffusers-format folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) that
     ``student.pretrained`` loads like SD 2.1's

Every --every UNet steps it prints the loss and how far the one-step x0 at t = 999 is
from each prompt's colour (mean foreground colour of the decoded image, L2 in RGB).

    python -m bench.tiny_base --out runs/tiny_base [--vae-steps 300] [--unet-steps 800]
    python -m bench.conditioning student.pretrained=runs/tiny_base \\
        student.train_base=false student.denoiser_skip=false
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from prd.config import load
from prd.model import build_model
from prd.student import TINY_UNET, TINY_VAE, sd_scheduler
from renderers.cameras import sample_cameras
from teachers.scenes import TRAIN_PROMPTS, parse_prompt, render_scenes, scene_color


def render_dataset(prompts, views: int, cameras_cfg, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) images in [-1, 1] and (N,) prompt indices, views of a prompt adjacent."""
    cams = sample_cameras(len(prompts) * views // cameras_cfg.n_views, cameras_cfg, gen)
    shapes = [parse_prompt(p)[1] for p in prompts for _ in range(views)]
    colors = torch.stack([scene_color(p) for p in prompts for _ in range(views)])
    rgb = render_scenes(shapes, colors, cams, 32, supersample=2).rgb
    return rgb.permute(0, 3, 1, 2) * 2 - 1, torch.arange(len(prompts)).repeat_interleave(views)


def train_vae(images: torch.Tensor, steps: int, batch: int, lr: float, gen) -> AutoencoderKL:
    """The tiny VAE (encoder + decoder) fitted to ``images``; the caller sets scaling_factor."""
    vae = AutoencoderKL(**TINY_VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + 1e-5 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            print(f"vae  {step:>5} mse+kl {loss.item():.4f} {time.perf_counter() - start:.0f}s")
    return vae


def colour_error(unet, vae, text: torch.Tensor, prompts, ab: torch.Tensor) -> float:
    """Mean L2 between each prompt's colour and the foreground of its one-step x0 image."""
    n = len(prompts)
    z = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.full((n,), len(ab) - 1)
    a = ab[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        x0 = (z - (1 - a).sqrt() * unet(z, t, encoder_hidden_states=text).sample) / a.sqrt()
        img = (vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2
    fg = ((img - 0.5).abs().sum(1, keepdim=True) > 0.15).float()  # off the grey background
    mean = (img * fg).sum((2, 3)) / fg.sum((2, 3)).clamp_min(1)
    truth = torch.stack([scene_color(p) for p in prompts])
    return (mean - truth).norm(dim=-1).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--views", type=int, default=64, help="images per training scene")
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--unet-steps", type=int, default=800)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"bench.tiny_base: {args.out} exists; choose a new folder")
    torch.set_num_threads(args.threads)
    cfg = load(args.config or ["configs/oracle.yaml"], [])
    if cfg.student.arch != "tiny" or cfg.student.pretrained is not None:
        raise SystemExit("bench.tiny_base: needs a config with student.arch=tiny, pretrained=null")
    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    prompts = list(TRAIN_PROMPTS)
    images, labels = render_dataset(prompts, args.views, cfg.cameras, gen)
    print(f"{len(images)} images of {len(prompts)} scenes")
    vae = train_vae(images, args.vae_steps, args.vae_batch, args.lr, gen)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x).latent_dist.mean for x in images.split(256)])
    vae.register_to_config(scaling_factor=1.0 / latents.std().item())  # SD's convention
    latents = latents * vae.config.scaling_factor

    student = build_model(cfg, seed=cfg.train.seed).student  # its text encoder and tokenizer
    text = student.encode_text(prompts + [""])  # the last row: the empty prompt
    unet = UNet2DConditionModel(**TINY_UNET)
    scheduler = sd_scheduler()
    ab = scheduler.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    start = time.perf_counter()
    for step in range(1, args.unet_steps + 1):
        i = torch.randint(0, len(latents), (args.unet_batch,), generator=gen)
        cond = labels[i].clone()
        cond[torch.rand(len(i), generator=gen) < 0.1] = len(prompts)
        noise = torch.randn(latents[i].shape, generator=gen)
        t = torch.randint(0, len(ab), (len(i),), generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * latents[i] + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=text[cond]).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.unet_steps:
            err = colour_error(unet, vae, text[:-1], prompts, ab)
            print(
                f"unet {step:>5} eps-mse {loss.item():.4f} x0@999 colour error {err:.3f} "
                f"{time.perf_counter() - start:.0f}s"
            )

    unet.save_pretrained(args.out / "unet")
    vae.save_pretrained(args.out / "vae")
    student.text_encoder.save_pretrained(args.out / "text_encoder")
    student.tokenizer.save_pretrained(args.out / "tokenizer")
    scheduler.save_pretrained(args.out / "scheduler")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
