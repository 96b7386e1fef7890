"""MVDream (sd-v2.1-base-4view): the original checkpoint, its cameras, a frozen Denoiser.

The model is ``teachers.multiview_unet.MultiViewUNet`` in MVDream's released configuration
(``RELEASED``, from the original ``configs/sd-v2-base.yaml``): SD 2.1-base's UNet with
64-channel heads, linear transformer projections, context 1024 (the SD 2.1 text encoder's
last hidden state), a 16-d camera, 4 views of 32 x 32 latents (256 px renders).

Cameras. MVDream was trained on camera-to-world matrices of a Y-up OpenGL camera turned
into Blender's Z-up axes (``get_camera``), translation normalized to unit length,
flattened row-major. Our cameras (``renderers.cameras``) live in a Z-up world already;
their c2w with a unit translation is what the reference (threestudio's MVDream guidance,
TriplaneTurbo) feeds, and it equals ``get_camera(elevation, azimuth + 90)``: MVDream
measures azimuth from -y where we measure it from +x.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from renderers.cameras import Cameras
from teachers import multiview_unet as mv
from teachers.base import TextMemo
from teachers.files import load_part
from teachers.sd import encode_prompts

RELEASED = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_head_channels=64,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=1,
    context_dim=1024,
    use_checkpoint=False,
    legacy=False,
    camera_dim=16,
)
"""The UNet arguments of sd-v2.1-base-4view (MVDream's configs/sd-v2-base.yaml)."""

NUM_FRAMES = 4
"""Views per object the released models were trained with."""

VAE_SCALING_FACTOR = 0.18215
"""scale_factor of the released config (SD's VAE)."""


def load_original(src, **ldm_kwargs) -> mv.MultiViewUNet:
    """MVDream's UNet from an original checkpoint: a path or a state dict, flat (as the
    released .pt, beside first_stage_model.* and cond_stage_model.*) or under
    "state_dict"; frozen, eval, fp32. ldm_kwargs: the original constructor's arguments
    (omitted ones take its defaults); none at all = ``RELEASED``."""
    return mv.load_original(src, ldm_kwargs or RELEASED)


def orbit_c2w(elevation, azimuth, distance=1.0, blender_coord: bool = True) -> Tensor:
    """(N, 4, 4) float64 c2w of the MVDream / ND code's cameras (broadcast inputs, degrees).

    The camera sits at distance * (cos el sin az, sin el, cos el cos az) in a Y-up world,
    looks at the origin with up hint +y (OpenGL axes: right, up, backward); Blender axes
    then map the world's (x, y, z) to (x, -z, y).
    """
    as64 = lambda v: torch.as_tensor(v, dtype=torch.float64).reshape(-1)
    el, az, d = torch.broadcast_tensors(as64(elevation), as64(azimuth), as64(distance))
    el, az = torch.deg2rad(el), torch.deg2rad(az)
    pos = torch.stack([el.cos() * az.sin(), el.sin(), el.cos() * az.cos()], -1) * d[:, None]
    back = pos / pos.norm(dim=-1, keepdim=True)
    up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(back)
    right = torch.linalg.cross(up, back, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True)
    new_up = torch.linalg.cross(back, right, dim=-1)
    c2w = torch.zeros(pos.shape[0], 4, 4, dtype=torch.float64)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, new_up, back, pos
    c2w[:, 3, 3] = 1.0
    if blender_coord:
        flip = torch.tensor(
            [[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64
        )
        c2w = flip @ c2w
    return c2w


def get_camera(
    num_frames: int,
    elevation: float = 15,
    azimuth_start: float = 0,
    azimuth_span: float = 360,
    blender_coord: bool = True,
) -> Tensor:
    """(num_frames, 16) float32 row-major c2w of ``num_frames`` cameras at unit distance,
    azimuths ``azimuth_start + i * azimuth_span / num_frames`` (degrees), as MVDream's
    ``camera_utils.get_camera``."""
    if num_frames < 1:
        raise ValueError(f"get_camera: num_frames must be >= 1, got {num_frames}")
    az = azimuth_start + torch.arange(num_frames, dtype=torch.float64) * (azimuth_span / num_frames)
    return orbit_c2w(elevation, az, 1.0, blender_coord).reshape(-1, 16).float()


def normalized_c2w(cameras: Cameras) -> Tensor:
    """(B, 4, 4) our c2w with the translation scaled to unit length (ldm's
    normalize_camera, 1e-8 added to the norm as there; the input is left unchanged)."""
    c2w = cameras.c2w.clone()
    t = c2w[:, :3, 3]
    c2w[:, :3, 3] = t / (t.norm(dim=-1, keepdim=True) + 1e-8)
    return c2w


def camera_condition(cameras: Cameras) -> Tensor:
    """(B, 16) MVDream's camera rows for our cameras (module docstring), cameras' dtype."""
    return normalized_c2w(cameras).reshape(-1, 16)


class MultiViewDenoiser(torch.nn.Module):
    """A frozen multi-view UNet with its text encoder: the ``teachers.base.Denoiser`` of
    MVDream and ND-MV.

    encode_text(prompts) -> (B, 77, D) last hidden states ("" is the unconditional one),
    each prompt encoded once while recent (``teachers.base.TextMemo``);
    forward(x_t, t, cond, cameras) -> eps (B, C, h, w) in x_t's dtype for B = objects x
    ``num_frames`` views (views of an object contiguous), integer timesteps t (B,).
    text_fn: prompts -> conditioning, in place of ``text_encoder`` + ``tokenizer`` (e.g.
    MVDream on the student's SD 2.1 text encoder, which it was trained with).
    """

    def __init__(
        self,
        unet,
        text_encoder,
        tokenizer,
        camera_condition,
        num_frames=NUM_FRAMES,
        text_fn: Callable[[list[str]], Tensor] | None = None,
    ):
        super().__init__()
        if (text_encoder is None) == (text_fn is None):
            raise ValueError("multi-view denoiser: give a text encoder or a text_fn, not both")
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.camera_condition = camera_condition
        self.num_frames = num_frames
        self.text_fn = text_fn
        self._memo = TextMemo(self._encode_new)
        self.requires_grad_(False)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def encode_text(self, prompts: list[str]) -> Tensor:
        return self._memo(prompts)

    @torch.no_grad()
    def _encode_new(self, prompts: list[str]) -> Tensor:
        if self.text_fn is not None:
            return self.text_fn(prompts)
        return encode_prompts(self.tokenizer, self.text_encoder, prompts)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor, cameras: Cameras | None) -> Tensor:
        n = x_t.shape[0]
        if cameras is None or len(cameras) != n or cond.shape[0] != n or n % self.num_frames:
            raise ValueError(
                f"multi-view denoiser: {n} inputs need as many cameras and conditionings "
                f"(got {None if cameras is None else len(cameras)} and {cond.shape[0]}) and a "
                f"multiple of {self.num_frames} views"
            )
        camera = self.camera_condition(cameras.to(dtype=torch.float32)).to(self.dtype)
        eps = self.unet(
            x_t.to(self.dtype),
            timesteps=t,  # never cast: a bf16 999 is 1000
            context=cond.to(self.dtype),
            camera=camera,
            num_frames=self.num_frames,
        )
        return eps.to(x_t.dtype)


def load_unet(pretrained: str | Path, ldm_kwargs: dict, dtype=torch.float32) -> mv.MultiViewUNet:
    """The frozen UNet in ``dtype`` from an original checkpoint file (built with
    ``ldm_kwargs``) or a ``prd convert`` folder (its unet/)."""
    path = Path(pretrained)
    if path.is_dir():
        sub = path / "unet" if (path / "unet" / "config.json").is_file() else path
        if not (sub / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no unet/config.json (not a `prd convert` folder)")
        unet = load_part(sub, lambda: mv.MultiViewUNet.from_pretrained(sub, torch_dtype=dtype))
        return unet.requires_grad_(False).eval()
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
    return mv.load_original(path, ldm_kwargs).to(dtype)


def load_text_encoder(folder: str | Path, dtype: torch.dtype, device=None):
    """(CLIPTextModel, CLIPTokenizer) of a diffusers SD folder (its text_encoder/ and
    tokenizer/), frozen."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    for sub in ("text_encoder", "tokenizer"):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"text-encoder folder {folder} has no {sub}/")
    tokenizer = load_part(
        folder / "tokenizer", lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer")
    )
    encoder = load_part(
        folder / "text_encoder",
        lambda: CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype),
    )
    return encoder.to(device).requires_grad_(False).eval(), tokenizer


def load_denoiser(
    pretrained: str | Path,
    text_encoder: str | Path | None = None,
    dtype=torch.float32,
    device=None,
    ldm_kwargs: dict | None = None,
    text_fn: Callable[[list[str]], Tensor] | None = None,
) -> MultiViewDenoiser:
    """MVDream as a frozen Denoiser on ``device`` in ``dtype``: pretrained is the original
    sd-v2.1-base-4view.pt or its ``prd convert`` folder; text_encoder a diffusers SD 2.1
    folder (the OpenCLIP ViT-H encoder MVDream was trained with), or None with ``text_fn``
    (the same encoder, already loaded); ldm_kwargs: the UNet arguments of an original file
    that is not the released model. Inputs are SD latents (scaling factor
    ``VAE_SCALING_FACTOR``) of 256 px renders."""
    for p in (pretrained, text_encoder):
        if p is not None and not Path(p).exists():
            raise FileNotFoundError(f"MVDream: {p} does not exist")
    unet = load_unet(pretrained, ldm_kwargs or RELEASED, dtype).to(device)
    encoder = tokenizer = None
    if text_encoder is not None:
        encoder, tokenizer = load_text_encoder(text_encoder, dtype, device)
    return MultiViewDenoiser(unet, encoder, tokenizer, camera_condition, text_fn=text_fn)


__all__ = [
    "NUM_FRAMES",
    "RELEASED",
    "MultiViewDenoiser",
    "camera_condition",
    "get_camera",
    "load_denoiser",
    "load_original",
]
