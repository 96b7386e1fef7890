"""The pretrained teachers from local files, and every path checked before anything loads.

- SD (2.1-base in the paper): a diffusers-format folder (``teachers.sd``). On the
  student's base folder it borrows the student's UNet (adapters off) and text encoder
  instead of loading a second copy.
- MVDream: the original ``sd-v2.1-base-4view.pt`` or its ``prd convert`` folder
  (``teachers.mvdream``). Its text encoder is SD 2.1's (``teachers.mvdream.text_encoder``,
  a diffusers SD folder; unset: the student's, which is that encoder). Its latents are
  SD's VAE's, read from the first folder with a ``vae/`` among ``teachers.mvdream.vae``,
  the converted folder, the SD teacher's folder and the student's base folder; a VAE
  already loaded for the SD teacher is shared.
- RichDreamer ND-MV: the original ``nd_mv_ema.ckpt`` or its converted folder
  (``teachers.richdreamer``), with CLIP ViT-L/14 from an SD-1.5-style folder
  (``teachers.richdreamer.text_encoder``, required); it works in pixel space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from teachers import mvdream, richdreamer, sd
from teachers.noise import NoiseSchedule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StudentBase:
    """What a teacher may borrow from the student: its base folder, its UNet as the
    pretrained model (``unet_context``), and its prompt encoding (``text_fn``)."""

    folder: str | None
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    unet_context: Callable
    text_fn: Callable[[list[str]], torch.Tensor]


@dataclass
class Loaded:
    """A pretrained role's frozen model and its image <-> model-space maps."""

    denoiser: torch.nn.Module
    schedule: NoiseSchedule
    encode: Callable | None = None
    """Renders (n, 3, H, W) in [-1, 1] -> latents, with gradients (None: pixel space)."""
    decode: Callable | None = None
    weights: tuple[torch.nn.Module, ...] = ()
    """The frozen modules of its own it runs (denoiser, VAE codec): what offload may move."""
    keep_resident: bool = False
    """It runs the student's own UNet (the SD teacher on the student's folder): never moved."""


def _same_folder(a: str | Path | None, b: str | Path | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def resolve_dtype(spec, device, default: torch.dtype = torch.float32) -> torch.dtype:
    """The spec's dtype; "auto" is fp16 on CUDA (the reference) and ``default`` (the run's
    frozen dtype) elsewhere."""
    if spec.dtype == "auto":
        return torch.float16 if torch.device(device or "cpu").type == "cuda" else default
    return DTYPES[spec.dtype]


def _check_unet_source(path: str, key: str) -> None:
    p = Path(path)
    if p.is_file():
        return
    if p.is_dir():
        if (p / "unet" / "config.json").is_file() or (p / "config.json").is_file():
            return
        raise FileNotFoundError(
            f"{key}: folder {p} has no unet/config.json; give the original checkpoint file "
            "or the folder `prd convert` wrote"
        )
    raise FileNotFoundError(f"{key}: {p} does not exist (the original checkpoint or its "
                            "`prd convert` folder)")  # fmt: skip


def _check_text_folder(path: str, key: str) -> None:
    p = Path(path)
    missing = [s for s in ("text_encoder/config.json", "tokenizer") if not (p / s).exists()]
    if missing:
        raise FileNotFoundError(
            f"{key}: {p} lacks {missing}; a text-encoder folder holds text_encoder/ and "
            "tokenizer/ (as a diffusers SD folder)"
        )


def mvdream_vae_folder(teachers, student_folder: str | None) -> Path:
    """The folder whose ``vae/`` MVDream's latents use (module docstring's order);
    FileNotFoundError listing the places looked at."""
    spec = teachers.mvdream
    if spec.vae is not None:
        if not (Path(spec.vae) / "vae" / "config.json").is_file():
            raise FileNotFoundError(f"teachers.mvdream.vae: {spec.vae} has no vae/config.json")
        return Path(spec.vae)
    sd_folder = teachers.sd.pretrained if teachers.sd.enabled else None
    tried = [spec.pretrained, sd_folder, student_folder]
    for folder in tried:
        if folder is not None and (Path(folder) / "vae" / "config.json").is_file():
            return Path(folder)
    raise FileNotFoundError(
        "teachers.mvdream: no SD VAE for its latents: none of "
        f"{[str(f) for f in tried if f is not None]} has vae/config.json; set "
        "teachers.mvdream.vae to a diffusers SD 2.1 folder (or give `prd convert`'s folder)"
    )


def check_pretrained(role: str, teachers, student_folder: str | None) -> None:
    """Fail before anything loads unless the ``role``'s files are all there
    (FileNotFoundError naming the key, the path and what was expected)."""
    spec = getattr(teachers, role)
    key = f"teachers.{role}"
    if spec.pretrained is None:
        what = {
            "sd": "a local diffusers-format stable-diffusion-2-1-base folder (e.g. the "
            "student's base folder)",
            "mvdream": "sd-v2.1-base-4view.pt or its `prd convert mvdream` folder",
            "richdreamer": "nd_mv_ema.ckpt or its `prd convert richdreamer` folder",
        }[role]
        raise ValueError(f"{key}.pretrained is not set: point it at {what}")
    if role == "sd":
        sd.check_sd_folder(spec.pretrained, f"{key}.pretrained")
        return
    _check_unet_source(spec.pretrained, f"{key}.pretrained")
    if role == "richdreamer" and spec.text_encoder is None:
        raise ValueError(
            f"{key}.text_encoder is not set: ND-MV needs CLIP ViT-L/14, the text_encoder/ "
            "and tokenizer/ of a local SD-1.5-style folder"
        )
    if spec.text_encoder is not None:
        _check_text_folder(spec.text_encoder, f"{key}.text_encoder")
    if role == "mvdream":
        mvdream_vae_folder(teachers, student_folder)


def sd_denoiser(
    spec, device, student: StudentBase | None, default: torch.dtype = torch.float32
) -> sd.SDDenoiser:
    """The SD role's frozen denoiser: the student's base weights when ``spec.pretrained``
    is the student's folder, else the folder's weights in the spec's dtype."""
    if student is not None and _same_folder(spec.pretrained, student.folder):
        tokenizer, _, _, vae, scheduler = sd.load_parts(
            spec.pretrained,
            resolve_dtype(spec, device, default),
            "teachers.sd.pretrained",
            unet=False,
        )
        return sd.SDDenoiser(
            tokenizer,
            student.text_encoder,
            student.unet,
            vae,
            scheduler,
            borrowed=student.unet_context,
            text_fn=student.text_fn,
            gradient_checkpointing=spec.gradient_checkpointing,
            where=f"teachers.sd.pretrained={spec.pretrained}",
        ).to(device)
    denoiser = sd.load_pretrained(
        spec.pretrained, resolve_dtype(spec, device, default), spec.gradient_checkpointing
    )
    return denoiser.to(device)


def _check_context(denoiser: mvdream.MultiViewDenoiser, role: str) -> None:
    """The UNet's context width must be its text encoder's (ValueError naming both)."""
    want = denoiser.unet.config.cross_attention_dim
    got = denoiser.encode_text([""]).shape[-1]
    if got != want:
        raise ValueError(
            f"teachers.{role}: the UNet takes text states of width {want}, its text encoder "
            f"gives {got}; set teachers.{role}.text_encoder to the encoder it was trained with"
        )


def _ldm(spec) -> dict | None:
    """The spec's ldm_kwargs as a plain dict (None: the released config)."""
    return {
        k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in spec.ldm_kwargs.items()
    } or None


def load(
    role: str,
    teachers,
    device,
    student: StudentBase | None,
    vaes: dict[Path, AutoencoderKL],
    default: torch.dtype = torch.float32,
) -> Loaded:
    """The ``role``'s frozen pretrained model on ``device``. ``vaes``: SD VAEs loaded so
    far by folder (read and filled), so the SD and MVDream teachers share one. ``default``:
    the dtype of an "auto" spec off CUDA (``resolve_dtype``)."""
    spec = getattr(teachers, role)
    dtype = resolve_dtype(spec, device, default)
    if role == "sd":
        den = sd_denoiser(spec, device, student, default)
        vaes[Path(spec.pretrained).resolve()] = den.vae
        return Loaded(
            den, den.schedule, den.encode_images, den.decode_latents,
            weights=(den,), keep_resident=den.borrowed is not None,
        )  # fmt: skip
    if role == "mvdream":
        text_fn = None
        if spec.text_encoder is None:
            if student is None:
                raise ValueError("teachers.mvdream.text_encoder is not set and no student")
            text_fn = student.text_fn
        den = mvdream.load_denoiser(
            spec.pretrained, spec.text_encoder, dtype, device, _ldm(spec), text_fn=text_fn
        )
        _check_context(den, role)
        folder = mvdream_vae_folder(teachers, student.folder if student else None).resolve()
        if folder not in vaes:
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
            vaes[folder] = vae.to(device)
        codec = sd.LatentCodec(vaes[folder], spec.gradient_checkpointing, "MVDream")
        return Loaded(
            den, NoiseSchedule(), codec.encode_images, codec.decode_latents, weights=(den, codec)
        )
    den = richdreamer.load_denoiser(spec.pretrained, spec.text_encoder, dtype, device, _ldm(spec))
    _check_context(den, role)
    return Loaded(den, NoiseSchedule(), weights=(den,))
