"""``prd convert``: an original MVDream / RichDreamer ND-MV checkpoint -> a diffusers folder.

    prd convert mvdream sd-v2.1-base-4view.pt --out weights/mvdream
    prd convert richdreamer nd_mv_ema.ckpt --out weights/nd_mv [--ldm-kwargs unet.json]

The folder holds unet/ (config.json + diffusion_pytorch_model.safetensors of a
``teachers.multiview_unet.MultiViewUNet``; safetensors load memory-mapped) and, when the
checkpoint carries an SD VAE under first_stage_model.* (MVDream's does), vae/ (an
``AutoencoderKL`` folder; its key conversion is diffusers' own ldm-VAE converter). Runs
accept the original file or this folder alike. The folder is written beside ``--out`` and
renamed into place at the end, so an existing ``--out`` is always complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

MODELS = ("mvdream", "richdreamer")
VAE_PREFIX = "first_stage_model."


def add_arguments(p) -> None:
    p.add_argument("model", choices=MODELS, help="which original model the checkpoint holds")
    p.add_argument("checkpoint", help="the original checkpoint (.pt / .ckpt)")
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument(
        "--ldm-kwargs",
        default=None,
        help="JSON file of the original UNet constructor's arguments (default: the released "
        "model's configuration)",
    )


def _indices(sd: dict, pattern: str) -> set[int]:
    return {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}


def vae_config(sd: dict[str, torch.Tensor], scaling_factor: float) -> dict:
    """``AutoencoderKL`` config read off an ldm VAE state dict (names without the prefix)."""
    try:
        levels = sorted(_indices(sd, r"encoder\.down\.(\d+)\."))
        widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
        blocks = _indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")
        return dict(
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            out_channels=sd["decoder.conv_out.weight"].shape[0],
            down_block_types=["DownEncoderBlock2D"] * len(levels),
            up_block_types=["UpDecoderBlock2D"] * len(levels),
            block_out_channels=widths,
            layers_per_block=len(blocks),
            latent_channels=sd["decoder.conv_in.weight"].shape[1],
            norm_num_groups=32,  # ldm's VAE Normalize: always 32 groups
            scaling_factor=scaling_factor,
        )
    except KeyError as exc:
        raise ValueError(f"{VAE_PREFIX}* does not look like an SD VAE: no {exc}") from None


def convert_vae(src: dict[str, torch.Tensor], scaling_factor: float):
    """An ``AutoencoderKL`` from the ``first_stage_model.*`` tensors of ``src`` (strict)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae_sd = {k: v for k, v in src.items() if k.startswith(VAE_PREFIX)}
    cfg = vae_config({k[len(VAE_PREFIX) :]: v for k, v in vae_sd.items()}, scaling_factor)
    vae = AutoencoderKL(**cfg)
    converted = convert_ldm_vae_checkpoint(vae_sd, cfg)
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"{VAE_PREFIX}*: missing {missing}, unexpected {unexpected}")
    return vae


def convert(model: str, checkpoint, out, ldm_kwargs: dict | None = None) -> Path:
    """Write the diffusers folder of an original checkpoint (module docstring); returns it."""
    from teachers import multiview_unet, mvdream, richdreamer
    from teachers.files import torch_load

    if model not in MODELS:
        raise ValueError(f"convert: model must be one of {MODELS}, got {model!r}")
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"convert: checkpoint {checkpoint} does not exist")
    if out.exists():
        raise FileExistsError(f"convert: {out} exists; give a new folder")
    module = mvdream if model == "mvdream" else richdreamer
    src = torch_load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    if "state_dict" in src and isinstance(src["state_dict"], dict):
        src = src["state_dict"]
    unet = multiview_unet.load_original(src, ldm_kwargs or module.RELEASED)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    if model == "mvdream" and any(k.startswith(VAE_PREFIX) for k in src):
        convert_vae(src, mvdream.VAE_SCALING_FACTOR).save_pretrained(
            tmp / "vae", safe_serialization=True
        )
    tmp.rename(out)
    return out


def run(args) -> int:
    kwargs = None
    if args.ldm_kwargs:
        kwargs = json.loads(Path(args.ldm_kwargs).read_text())
        if not isinstance(kwargs, dict):
            raise ValueError(f"{args.ldm_kwargs}: expected a JSON object of UNet arguments")
    out = convert(args.model, args.checkpoint, args.out, kwargs)
    parts = sorted(p.name for p in out.iterdir())
    print(f"prd convert: wrote {out} ({', '.join(parts)})")
    return 0
