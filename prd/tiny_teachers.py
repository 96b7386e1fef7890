"""``prd tiny-teachers``: learned tiny MVDream and ND-MV, pretrained in code on the oracle
world's views, written as the released checkpoints are.

The tiny SD of ``prd tiny-base`` is the student's base and, through the shared weights,
the SD teacher; this adds the two multi-view teachers, trained as their papers train
them (eps prediction on SD's DDPM schedule, 10% empty prompts for classifier-free
guidance, one timestep per object shared by its 4 views) on the 30 training scenes only:

  1. views: ``sets`` random 4-view camera sets of each training scene from the run's
     camera distribution (``renderers.cameras.sample_cameras``), rendered by the oracle
     world (``teachers.scenes.render_scenes``, 32 px, 2x2 supersampled, grey background)
  2. MVDream, started from the tiny SD's UNet as MVDream from SD 2.1's: RGB packed by
     its role (``teachers.roles.MultiViewRGB``), encoded by the tiny base's VAE (times
     its scaling factor); text: the tiny base's text encoder (as MVDream conditions on
     SD 2.1's); cameras: ``teachers.mvdream.camera_condition``
  3. ND-MV, started from the tiny SD's UNet where shapes allow (``nd_from_single_view``)
     as RichDreamer's ND-MV from SD: normal + depth packed by its role
     (``teachers.roles.MultiViewNormalDepth`` at ``Recipe.depth_radius``), 4 pixel
     channels; text: the encoder of the SD it starts from (as ND-MV keeps SD 1.5's CLIP
     ViT-L), copied to an SD-1.5-style folder; cameras:
     ``teachers.richdreamer.camera_condition``
  4. the files, in the original layouts by the port's inverse key map
     (``teachers.multiview_unet.diffusers_to_ldm``), so that they load through
     ``load_original`` / ``load_denoiser`` exactly as the released ones:

    DIR/sd/                   the tiny SD (diffusers folder; ``prd.arch.load_pretrained``)
    DIR/mvdream.pt            flat dict of model.diffusion_model.* (MVDream's .pt); its VAE
                              is DIR/sd/vae (no first_stage_model.*: ``prd convert`` reads
                              an ldm VAE as 32-group SD, the tiny VAE has 8 groups)
    DIR/mvdream_unet.json     the UNet's ldm constructor arguments (``--ldm-kwargs``)
    DIR/nd_mv.ckpt            {"state_dict": {model.diffusion_model.*}} (nd_mv_ema.ckpt)
    DIR/nd_mv_unet.json
    DIR/nd_text/              text_encoder/ + tokenizer/ of ND-MV (the tiny SD's)
    DIR/tiny_teachers.json    what a run needs to use them (files, resolution, scaling
                              factor, depth radius, background) and what was rendered

    prd tiny-teachers --out runs/tiny_teachers [--base runs/tiny_base] [--config ...]
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import Tensor

from prd import tiny_base
from prd.arch import TINY_TEXT, encode_prompts, load_pretrained, sd_scheduler
from prd.config import load
from prd.progressive import add_noise
from renderers.cameras import CameraSampling, sample_cameras
from teachers import multiview_unet as mv
from teachers import mvdream, richdreamer
from teachers.base import Views
from teachers.roles import MultiViewNormalDepth, MultiViewRGB
from teachers.scenes import TRAIN_PROMPTS, parse_prompt, render_scenes, scene_color

NUM_FRAMES = mvdream.NUM_FRAMES
RESOLUTION = tiny_base.IMAGE_SIZE
"""Render size of both teachers' views (pixels): the tiny VAE makes 8 x 8 latents of them,
ND-MV sees them as they are (the released ND-MV works at 32 px too)."""
BACKGROUND = tiny_base.BACKGROUND
DEPTH_RADIUS = MultiViewNormalDepth().radius
"""Half-extent r of ND-MV's depth range near / far = distance -+ r sqrt(3). RichDreamer's
1.0 (``teachers.richdreamer.DEPTH_RADIUS``) bounds its objects, scaled into [-1, 1]^3; the
oracle scenes lie within radius 0.55, and at r = 1 their depths would fill a third of
[-1, 1]. The role's default 0.5 is the scenes' own half-extent, as 1.0 is RichDreamer's,
and the oracle ND teacher packs with it: the data and the role agree on it."""

MV_LDM = dict(
    image_size=RESOLUTION // 4,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[1, 2],
    num_res_blocks=1,
    channel_mult=[1, 2],
    num_head_channels=16,
    use_linear_in_transformer=True,
    transformer_depth=1,
    context_dim=TINY_TEXT["hidden_size"],
    camera_dim=16,
)
"""Tiny MVDream (the released layout's options: linear projections, heads of fixed width):
the tiny SD UNet's blocks (``prd.arch.TINY_UNET``: widths 32, 64, 16-channel heads,
attention at both levels), so that it starts from the tiny SD's weights as MVDream from SD
2.1's; joint attention over 4 x 64 tokens of the 8 x 8 latents is cheap."""

ND_LDM = dict(
    image_size=RESOLUTION,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[4],
    num_res_blocks=1,
    channel_mult=[1, 1, 2],
    num_heads=4,
    transformer_depth=1,
    context_dim=TINY_TEXT["hidden_size"],
    camera_dim=16,
)
"""Tiny ND-MV (the released layout's options: 1x1-conv projections, a head count): 32 px
pixels need three levels (32, 16, 8); attention only at 8 x 8 and the middle, because
joint attention over 4 views of 16 x 16 (1024 tokens) cost 1.5 s of a 2.6 s step of 4
objects here, and the released model's 32 x 32 attention 4x more; 4 heads of 16. Below
the 32 px level its blocks are the tiny SD's (widths 32, 64; attention at 8 x 8), so that
it starts from them; its text is the tiny SD's (width 32)."""


@dataclass
class Recipe:
    """How long and on what the tiny teachers train (the defaults make the embedded ones)."""

    sets: int = 32
    """4-view camera sets rendered per training scene."""
    mv_steps: int = 400
    mv_batch: int = 8
    """Objects (of 4 views) per MVDream step."""
    nd_steps: int = 600
    nd_batch: int = 8
    """Objects (of 4 views) per ND-MV step."""
    nd_high_t_share: float = 0.8
    """ND-MV's ``high_t_share``: the text decides its images (shapes) only at high t; at
    0.3 its eps error ignored the prompt after 1,600 objects (ratio wrong / right prompt
    1.00-1.01 at t = 100, 500, 800)."""
    lr: float = 2e-3
    high_t_share: float = 0.3
    """Share of timesteps drawn from the top 30% of the schedule instead (the text decides
    the image there; ``prd.tiny_base.draw_timesteps``)."""
    empty_share: float = 0.1
    """Share of objects trained on the empty prompt (classifier-free guidance)."""
    depth_radius: float = DEPTH_RADIUS
    """ND-MV's depth normalization radius (``DEPTH_RADIUS``); the run's role must use it."""
    seed: int = 0

    def __post_init__(self):
        for name in ("sets", "mv_steps", "mv_batch", "nd_steps", "nd_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"tiny-teachers: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("high_t_share", "nd_high_t_share", "empty_share"):
            if not 0 <= getattr(self, name) <= 1:
                value = getattr(self, name)
                raise ValueError(f"tiny-teachers: {name} must lie in [0, 1], got {value}")
        if self.lr <= 0 or self.depth_radius <= 0:
            raise ValueError(
                f"tiny-teachers: lr and depth_radius must be > 0, got {self.lr}, "
                f"{self.depth_radius}"
            )


def render_view_sets(
    prompts: list[str], sets: int, cameras: CameraSampling, gen: torch.Generator, size=RESOLUTION
) -> tuple[Views, Tensor]:
    """``sets`` 4-view sets of each prompt's scene: Views (len(prompts) * sets * 4 views,
    those of a set contiguous, sets of a prompt adjacent) and the (n_sets,) prompt index of
    each set. The only rendering of a build: every prompt given here, no other."""
    if cameras.n_views != NUM_FRAMES:
        raise ValueError(
            f"tiny-teachers: cameras.n_views must be {NUM_FRAMES}, got {cameras.n_views}"
        )
    labels = torch.arange(len(prompts)).repeat_interleave(sets)
    cams = sample_cameras(len(labels), cameras, gen)
    per_view = labels.repeat_interleave(NUM_FRAMES).tolist()
    shapes = [parse_prompt(prompts[i])[1] for i in per_view]
    colors = torch.stack([scene_color(prompts[i]) for i in per_view])
    r = render_scenes(shapes, colors, cams, size, BACKGROUND, supersample=2)
    return Views(r.rgb, r.mask, r.depth, r.normal, cams, NUM_FRAMES), labels


def object_rows(objects: Tensor) -> Tensor:
    """(b,) object indices -> (b * 4,) view rows, the 4 views of an object contiguous."""
    return (objects[:, None] * NUM_FRAMES + torch.arange(NUM_FRAMES)).reshape(-1)


def train_multiview(
    unet: mv.MultiViewUNet,
    x0: Tensor,
    camera: Tensor,
    labels: Tensor,
    text: Tensor,
    steps: int,
    batch: int,
    recipe: Recipe,
    gen: torch.Generator,
    log=print,
    name: str = "mv",
) -> float:
    """Train ``unet`` in place to predict the noise of noised 4-view sets; returns the last
    loss.

    x0: (n_sets * 4, C, h, w) clean inputs, views of a set contiguous; camera: (n_sets * 4,
    16) their camera rows; labels: (n_sets,) rows of text (n_prompts + 1, 77, D), whose last
    row is the empty prompt. One timestep and one prompt per set (all its views).
    """
    ab = sd_scheduler().alphas_cumprod
    empty = len(text) - 1
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr)
    unet.train()
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        objects = torch.randint(0, len(labels), (batch,), generator=gen)
        cond = labels[objects].clone()
        cond[torch.rand(batch, generator=gen) < recipe.empty_share] = empty
        t = tiny_base.draw_timesteps(batch, len(ab), recipe.high_t_share, gen)
        t = t.repeat_interleave(NUM_FRAMES)
        rows = object_rows(objects)
        noise = torch.randn(x0[rows].shape, generator=gen)
        x_t = add_noise(x0[rows], noise, t, ab)
        context = text[cond].repeat_interleave(NUM_FRAMES, dim=0)
        eps = unet(x_t, timesteps=t, context=context, camera=camera[rows], num_frames=NUM_FRAMES)
        loss = F.mse_loss(eps, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            log(f"{name} {step:>5} eps-mse {loss.item():.4f} {time.perf_counter() - start:.0f}s")
    unet.requires_grad_(False).eval()
    return loss.item()


def from_single_view(sd_unet: UNet2DConditionModel, ldm_kwargs: dict) -> mv.MultiViewUNet:
    """A multi-view UNet starting from the single-view SD UNet's weights, as MVDream starts
    from SD 2.1 (same blocks and widths; every SD tensor is used). The camera MLP is new;
    its output layer starts at zero, so the first step predicts as SD with joint-view
    self-attention. (The ldm blocks normalize in 32 groups where the tiny SD has 8: the
    weights carry over, the statistics are relearnt.)"""
    model = mv.MultiViewUNet.build(mv.unet_config(ldm_kwargs))
    missing, unexpected = model.load_state_dict(sd_unet.state_dict(), strict=False)
    new = [k for k in missing if not k.startswith("class_embedding.")]
    if new or unexpected:
        raise ValueError(
            f"tiny-teachers: the SD UNet does not fit {ldm_kwargs}: missing {new}, "
            f"unexpected {unexpected}"
        )
    with torch.no_grad():
        model.class_embedding.linear_2.weight.zero_()
        model.class_embedding.linear_2.bias.zero_()
    return model


def shifted_level(name: str, shift: int) -> str:
    """The tiny SD UNet's name of a multi-view UNet tensor that sits ``shift`` levels
    deeper (ND-MV's extra 32 px level on top): down_blocks.{i} <- down_blocks.{i - shift},
    up_blocks.{i} <- up_blocks.{i} (the up path counts from the deepest level)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        parts[1] = str(int(parts[1]) - shift)
    return ".".join(parts)


def nd_from_single_view(sd_unet: UNet2DConditionModel, ldm_kwargs: dict) -> mv.MultiViewUNet:
    """ND-MV starting from the single-view tiny SD where shapes allow, as RichDreamer's
    ND-MV starts from SD (through a single-view normal-depth model): its levels below the
    32 px one are the SD's (``shifted_level``), with the SD's text cross-attention; the
    SD's linear transformer projections become ND-MV's 1x1 convs. New: the 32 px level,
    the SD's attention-free counterparts' attention, the camera MLP (output zero).
    Returns the model; ValueError if fewer than half of its tensors come from the SD."""
    model = mv.MultiViewUNet.build(mv.unet_config(ldm_kwargs))
    shift = len(ldm_kwargs["channel_mult"]) - len(sd_unet.config.block_out_channels)
    sd, own = sd_unet.state_dict(), model.state_dict()
    taken = {}
    for name, value in own.items():
        src = sd.get(shifted_level(name, shift))
        if src is not None and src.numel() == value.numel() and src.dim() in (value.dim(), 2):
            taken[name] = src.reshape(value.shape)
    if len(taken) < len(own) / 2:
        raise ValueError(
            f"tiny-teachers: the SD UNet fits only {len(taken)} of {len(own)} tensors of "
            f"{ldm_kwargs}"
        )
    model.load_state_dict(taken, strict=False)
    with torch.no_grad():
        model.class_embedding.linear_2.weight.zero_()
        model.class_embedding.linear_2.bias.zero_()
    return model


def original_checkpoint(unet: mv.MultiViewUNet, ldm_kwargs: dict) -> dict[str, Tensor]:
    """The flat ldm state dict (``model.diffusion_model.*``) of ``unet``, as the original
    MultiViewUNetModel(**ldm_kwargs) names its tensors."""
    sd = mv.diffusers_to_ldm(unet.state_dict(), mv.unet_config(ldm_kwargs))
    return {mv.PREFIX + k: v.detach().clone().contiguous() for k, v in sd.items()}


def write_text_folder(folder: Path, text_encoder, tokenizer) -> None:
    """An SD-1.5-style text folder: text_encoder/ and tokenizer/."""
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")


def manifest(recipe: Recipe, cameras: CameraSampling, scaling_factor: float, prompts, log):
    """The contents of tiny_teachers.json (module docstring)."""
    return dict(
        sd="sd",
        mvdream=dict(
            checkpoint="mvdream.pt",
            ldm_kwargs=MV_LDM,
            text_encoder="sd",
            vae="sd",
            scaling_factor=scaling_factor,
            resolution=RESOLUTION,
        ),
        richdreamer=dict(
            checkpoint="nd_mv.ckpt",
            ldm_kwargs=ND_LDM,
            text_encoder="nd_text",
            depth_radius=recipe.depth_radius,
            resolution=RESOLUTION,
        ),
        background=list(BACKGROUND),
        cameras=asdict(cameras),
        rendered_prompts=list(prompts),
        recipe=asdict(recipe),
        log=log,
    )


def build_tiny_teachers(
    out: Path,
    cameras: CameraSampling,
    recipe: Recipe,
    base: Path | None = None,
    base_recipe: tiny_base.Recipe | None = None,
    log=print,
) -> Path:
    """Write the tiny teachers (and the tiny SD: a copy of ``base``, or built with
    ``base_recipe``) to ``out``, which must not exist; returns ``out``."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"tiny-teachers: {out} exists; remove it or choose a new folder")
    if base is not None and not Path(base).is_dir():
        raise FileNotFoundError(f"tiny-teachers: --base {base} is not a folder")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # a killed earlier build's leftovers
    staging.mkdir(parents=True)
    start = time.perf_counter()
    if base is not None:
        shutil.copytree(base, staging / "sd")
    else:
        tiny_base.build_tiny_base(staging / "sd", cameras, base_recipe or tiny_base.Recipe(), log)
    sd_tokenizer, sd_text, sd_unet, vae, _ = load_pretrained(staging / "sd", "tiny", torch.float32)
    vae.requires_grad_(False)

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    prompts = list(TRAIN_PROMPTS)
    views, labels = render_view_sets(prompts, recipe.sets, cameras, gen)
    log(f"{len(views.rgb)} views of {len(prompts)} scenes {time.perf_counter() - start:.0f}s")
    seconds = {}

    # MVDream: RGB latents of the tiny VAE, the tiny SD's text states
    latents = tiny_base.encode(vae, MultiViewRGB(NUM_FRAMES).encode(views, RESOLUTION))
    text = encode_prompts(sd_tokenizer, sd_text, prompts + [""])
    mv_unet = from_single_view(sd_unet, MV_LDM)
    t0 = time.perf_counter()
    mv_loss = train_multiview(
        mv_unet, latents, mvdream.camera_condition(views.cameras), labels, text,
        recipe.mv_steps, recipe.mv_batch, recipe, gen, log, "mvdream",
    )  # fmt: skip
    seconds["mvdream"] = round(time.perf_counter() - t0, 1)
    torch.save(original_checkpoint(mv_unet, MV_LDM), staging / "mvdream.pt")

    # ND-MV: normal + depth as its role packs them, from the tiny SD and its text
    role = MultiViewNormalDepth(NUM_FRAMES, radius=recipe.depth_radius)
    packed = role.encode(views, RESOLUTION)
    nd_unet = nd_from_single_view(sd_unet, ND_LDM)
    t0 = time.perf_counter()
    nd_loss = train_multiview(
        nd_unet, packed, richdreamer.camera_condition(views.cameras), labels, text,
        recipe.nd_steps, recipe.nd_batch, replace(recipe, high_t_share=recipe.nd_high_t_share),
        gen, log, "nd-mv",
    )  # fmt: skip
    seconds["richdreamer"] = round(time.perf_counter() - t0, 1)
    torch.save({"state_dict": original_checkpoint(nd_unet, ND_LDM)}, staging / "nd_mv.ckpt")
    write_text_folder(staging / "nd_text", sd_text, sd_tokenizer)

    (staging / "mvdream_unet.json").write_text(json.dumps(MV_LDM, indent=1))
    (staging / "nd_mv_unet.json").write_text(json.dumps(ND_LDM, indent=1))
    history = dict(seconds=seconds, final_eps_mse=dict(mvdream=mv_loss, richdreamer=nd_loss))
    info = manifest(recipe, cameras, vae.config.scaling_factor, prompts, history)
    (staging / "tiny_teachers.json").write_text(json.dumps(info, indent=1))
    staging.rename(out)
    log(f"wrote {out} in {time.perf_counter() - start:.0f}s")
    return out


def read_manifest(folder: str | Path) -> dict:
    """tiny_teachers.json of a ``prd tiny-teachers`` folder (FileNotFoundError naming it)."""
    path = Path(folder) / "tiny_teachers.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no tiny_teachers.json (`prd tiny-teachers --out` it)")
    return json.loads(path.read_text())


def load_teachers(folder: str | Path, dtype=torch.float32, device=None) -> dict:
    """{"mvdream": Denoiser, "richdreamer": Denoiser} of a ``prd tiny-teachers`` folder,
    through the released models' loaders (``load_denoiser`` with the folder's UNet
    arguments)."""
    folder = Path(folder)
    info = read_manifest(folder)
    out = {}
    for name, module in (("mvdream", mvdream), ("richdreamer", richdreamer)):
        spec = info[name]
        out[name] = module.load_denoiser(
            folder / spec["checkpoint"],
            folder / spec["text_encoder"],
            dtype=dtype,
            device=device,
            ldm_kwargs=spec["ldm_kwargs"],
        )
    return out


def add_arguments(p) -> None:
    d = Recipe()
    p.add_argument("--out", required=True, type=Path, help="folder to write (must not exist)")
    p.add_argument(
        "--base", type=Path, default=None, help="an existing tiny-base folder to copy as sd/ "
        "(default: build one with prd tiny-base's defaults)",
    )  # fmt: skip
    p.add_argument(
        "--config", action="append", default=[], help="YAML preset: its cameras (default oracle)"
    )
    p.add_argument("--sets", type=int, default=d.sets, help="4-view sets per training scene")
    p.add_argument("--mv-steps", type=int, default=d.mv_steps)
    p.add_argument("--nd-steps", type=int, default=d.nd_steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run(args) -> int:
    cfg = load(args.config or ["configs/oracle.yaml"], [])
    recipe = Recipe(
        sets=args.sets, mv_steps=args.mv_steps, nd_steps=args.nd_steps, lr=args.lr, seed=args.seed
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    build_tiny_teachers(args.out, cfg.cameras, recipe, base=args.base)
    return 0
