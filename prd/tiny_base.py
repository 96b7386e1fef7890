"""``prd tiny-base``: pretrain the tiny SD in code on the oracle world's images.

The method starts from a pretrained SD 2.1; the embedded default has no such weights, so
this builds their stand-in: the tiny arch, pretrained as SD was, on the images of the
world its teachers know. A random-init tiny UNet barely learns to follow its text within
the default run's budget (``bench/conditioning.py`` measures it); this base does.

  1. images: ``views`` random training cameras of each training scene (32 px, 2x2
     supersampled, grey background); no held-out scene is ever rendered
  2. the tiny VAE (encoder and decoder): MSE + 1e-5 KL; then SD's convention,
     scaling_factor = 1 / std of the latents
  3. the tiny UNet: epsilon prediction on the scaled latents, conditioned on a frozen
     random-init tiny CLIP text encoder (seeded; its token embeddings wider than CLIP's
     init, see ``Recipe.text_token_std``), 10% empty prompts (classifier-free
     guidance); 80% of the timesteps from the top 30% of the schedule, where the text
     decides most of the image (measured: the one-step x0 at t = 999 follows the prompt's
     colour sooner)
  4. a diffusers-format folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) that
     ``student.pretrained`` loads like SD 2.1's. It is written beside ``--out`` and renamed
     into place at the end, so an existing folder is always complete.

    prd tiny-base --out runs/tiny_base [--config configs/oracle.yaml] [--views 64] ...
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from prd.arch import TINY_TEXT, TINY_UNET, TINY_VAE, encode_prompts, sd_scheduler
from prd.config import load
from prd.progressive import add_noise, x0_from_eps
from prompts.tokenizer import build_clip_tokenizer
from renderers.cameras import CameraSampling, sample_cameras
from teachers.scenes import TRAIN_PROMPTS, parse_prompt, render_scenes, scene_color

IMAGE_SIZE = 32
BACKGROUND = (0.5, 0.5, 0.5)


@dataclass
class Recipe:
    """How long and on what the tiny base trains (the defaults make the embedded one)."""

    views: int = 64
    """Images per training scene."""
    vae_steps: int = 200
    vae_batch: int = 16
    unet_steps: int = 450
    unet_batch: int = 64
    vae_lr: float = 1e-3
    unet_lr: float = 2e-3
    high_t_share: float = 0.8
    """Share of each UNet batch whose timestep is drawn from the top 30% of the schedule."""
    text_token_std: float = 0.3
    """Std of the frozen text encoder's token embeddings. A pretrained CLIP tells its words
    apart; a random-init one at CLIP's init std (0.02) maps them to nearly parallel states
    (``text_state_cosine`` between the colour words of prompts of different colours:
    0.84-0.95 over three inits), which the UNet's cross-attention separates slowly. At 0.3:
    0.44-0.76, and the UNet's x0@999 colour probe read 0.31 after 450 steps (0.30 at std
    1.0), against 0.42 at 0.02."""
    seed: int = 0

    def __post_init__(self):
        for name in ("views", "vae_steps", "vae_batch", "unet_steps", "unet_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"tiny-base: {name} must be >= 1, got {getattr(self, name)}")
        if self.text_token_std <= 0:
            raise ValueError(f"tiny-base: text_token_std must be > 0, got {self.text_token_std}")
        if not 0 <= self.high_t_share <= 1:
            raise ValueError(f"tiny-base: high_t_share must lie in [0, 1], got {self.high_t_share}")


def render_dataset(
    prompts: list[str], views: int, cameras: CameraSampling, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) images in [-1, 1] and (N,) prompt indices; views of a prompt adjacent."""
    if views % cameras.n_views:
        raise ValueError(f"tiny-base: views ({views}) must be a multiple of cameras.n_views")
    cams = sample_cameras(len(prompts) * views // cameras.n_views, cameras, gen)
    shapes = [parse_prompt(p)[1] for p in prompts for _ in range(views)]
    colors = torch.stack([scene_color(p) for p in prompts for _ in range(views)])
    rgb = render_scenes(shapes, colors, cams, IMAGE_SIZE, BACKGROUND, supersample=2).rgb
    return rgb.permute(0, 3, 1, 2) * 2 - 1, torch.arange(len(prompts)).repeat_interleave(views)


def train_vae(images: torch.Tensor, recipe: Recipe, gen: torch.Generator, log) -> AutoencoderKL:
    """The tiny VAE fitted to ``images``, its scaling_factor set to 1 / std of their latents."""
    vae = AutoencoderKL(**TINY_VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr)
    start = time.perf_counter()
    for step in range(1, recipe.vae_steps + 1):
        x = images[torch.randint(0, len(images), (recipe.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + 1e-5 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == recipe.vae_steps:
            log(f"vae  {step:>5} mse+kl {loss.item():.4f} {time.perf_counter() - start:.0f}s")
    vae.register_to_config(scaling_factor=1.0 / posterior_means(vae, images).std().item())
    return vae


def posterior_means(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vae.encode(x).latent_dist.mean for x in images.split(256)])


def encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of ``images`` times the VAE's scaling factor, as SD trains on them."""
    return posterior_means(vae, images) * vae.config.scaling_factor


def draw_timesteps(n: int, n_train: int, high_t_share: float, gen: torch.Generator):
    """Uniform timesteps, of which a ``high_t_share`` share from the top 30% instead."""
    t = torch.randint(0, n_train, (n,), generator=gen)
    high = torch.rand(n, generator=gen) < high_t_share
    top = int(0.7 * n_train)
    t[high] = torch.randint(top, n_train, (int(high.sum()),), generator=gen)
    return t


def train_unet(
    latents: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    recipe: Recipe,
    gen: torch.Generator,
    log,
    probe=None,
) -> UNet2DConditionModel:
    """The tiny UNet trained to predict the noise of noised ``latents``.

    text: (n_prompts + 1, 77, C), the last row the empty prompt; labels index its rows.
    probe(unet) -> str, when given, is logged every 100 steps.
    """
    unet = UNet2DConditionModel(**TINY_UNET)
    ab = sd_scheduler().alphas_cumprod
    empty = len(text) - 1
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr)
    start = time.perf_counter()
    for step in range(1, recipe.unet_steps + 1):
        i = torch.randint(0, len(latents), (recipe.unet_batch,), generator=gen)
        cond = labels[i].clone()
        cond[torch.rand(len(i), generator=gen) < 0.1] = empty
        noise = torch.randn(latents[i].shape, generator=gen)
        t = draw_timesteps(len(i), len(ab), recipe.high_t_share, gen)
        z_t = add_noise(latents[i], noise, t, ab)
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=text[cond]).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == recipe.unet_steps:
            extra = f" {probe(unet)}" if probe else ""
            seconds = time.perf_counter() - start
            log(f"unet {step:>5} eps-mse {loss.item():.4f}{extra} {seconds:.0f}s")
    return unet


def colour_error(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text: torch.Tensor, prompts: list[str]
) -> float:
    """Mean L2 between each prompt's colour and the mean off-background colour of the image
    its one-step x0 at t = 999 decodes to: does the UNet follow the text yet?"""
    ab = sd_scheduler().alphas_cumprod
    n = len(prompts)
    z = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.full((n,), len(ab) - 1)
    with torch.no_grad():
        x0 = x0_from_eps(z, unet(z, t, encoder_hidden_states=text).sample, t, ab)
        img = (vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2
    grey = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    fg = ((img - grey).abs().sum(1, keepdim=True) > 0.15).float()
    mean = (img * fg).sum((2, 3)) / fg.sum((2, 3)).clamp_min(1)
    truth = torch.stack([scene_color(p) for p in prompts])
    return (mean - truth).norm(dim=-1).mean().item()


def frozen_text_encoder(
    token_std: float, gen: torch.Generator, config: dict = TINY_TEXT
) -> CLIPTextModel:
    """A tiny CLIP text encoder (``config``: CLIPTextConfig arguments), random-init and
    frozen, token embeddings ~ N(0, token_std)."""
    text_encoder = CLIPTextModel(CLIPTextConfig(**config)).requires_grad_(False).eval()
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0.0, token_std, generator=gen)
    return text_encoder


def text_state_cosine(text: torch.Tensor, prompts: list[str], word: int) -> float:
    """Mean cosine between the text states (n, 77, C) of prompts whose word ``word``
    (0-based, after the start token) differs, at that word's position."""
    words = [p.split()[word] for p in prompts]
    states = F.normalize(text[:, word + 1], dim=-1)
    cos = states @ states.T
    differ = torch.tensor([[a != b for b in words] for a in words])
    return cos[differ].mean().item()


def build_tiny_base(out: Path, cameras: CameraSampling, recipe: Recipe, log=print) -> Path:
    """Train the tiny base and write it to ``out`` (which must not exist); returns ``out``."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"tiny-base: {out} exists; remove it or choose a new folder")
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    prompts = list(TRAIN_PROMPTS)
    start = time.perf_counter()
    images, labels = render_dataset(prompts, recipe.views, cameras, gen)
    log(f"{len(images)} images of {len(prompts)} scenes {time.perf_counter() - start:.0f}s")
    vae = train_vae(images, recipe, gen, log)
    latents = encode(vae, images)

    tokenizer = build_clip_tokenizer()
    text_encoder = frozen_text_encoder(recipe.text_token_std, gen)
    text = encode_prompts(tokenizer, text_encoder, prompts + [""])  # last row: empty prompt
    log(f"text states: colour words' cosine {text_state_cosine(text[:-1], prompts, 1):.2f}")

    def probe(unet):
        return f"x0@999 colour error {colour_error(unet, vae, text[:-1], prompts):.3f}"

    unet = train_unet(latents, labels, text, recipe, gen, log, probe)

    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # a killed earlier build's leftovers
    unet.save_pretrained(staging / "unet")
    vae.save_pretrained(staging / "vae")
    text_encoder.save_pretrained(staging / "text_encoder")
    tokenizer.save_pretrained(staging / "tokenizer")
    sd_scheduler().save_pretrained(staging / "scheduler")
    staging.rename(out)
    log(f"wrote {out} in {time.perf_counter() - start:.0f}s")
    return out


def add_arguments(p) -> None:
    defaults = Recipe()
    p.add_argument("--out", required=True, type=Path, help="folder to write (must not exist)")
    p.add_argument(
        "--config", action="append", default=[], help="YAML preset: its cameras (default oracle)"
    )
    p.add_argument("--views", type=int, default=defaults.views, help="images per scene")
    p.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    p.add_argument("--unet-steps", type=int, default=defaults.unet_steps)
    p.add_argument("--vae-lr", type=float, default=defaults.vae_lr)
    p.add_argument("--unet-lr", type=float, default=defaults.unet_lr)
    p.add_argument("--high-t-share", type=float, default=defaults.high_t_share)
    p.add_argument("--text-token-std", type=float, default=defaults.text_token_std)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run(args) -> int:
    cfg = load(args.config or ["configs/oracle.yaml"], [])
    recipe = Recipe(
        views=args.views,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        vae_lr=args.vae_lr,
        unet_lr=args.unet_lr,
        high_t_share=args.high_t_share,
        text_token_std=args.text_token_std,
        seed=args.seed,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    build_tiny_base(args.out, cfg.cameras, recipe)
    return 0
