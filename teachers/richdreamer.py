"""RichDreamer's normal-depth multi-view model (ND-MV, ``nd_mv_ema.ckpt``).

The model is ``teachers.multiview_unet.MultiViewUNet`` in ND-MV's released configuration
(``RELEASED``, from normal-depth-diffusion's
``configs/inference/nd/txtcond_mvsd-4-objaverse_finetune_wovae.yaml``): an SD-1.5-shaped
UNet with 8 heads everywhere, 1x1-conv transformer projections, context 768 (CLIP
ViT-L/14's last hidden state, an SD-1.5 folder's text encoder), a 16-d camera. It works in
pixel space: 4 views of 32 x 32 x 4 (no VAE).

Input channels (``teachers.roles.MultiViewNormalDepth`` packs them): the camera-frame
normal with x flipped over the background (0, 0, 1), and depth as (far - d) / (far - near)
with near / far = camera distance -+ radius sqrt(3) (RichDreamer's renderers: radius 1),
clamped to [0, 1], background 0. **All four channels enter the model in [-1, 1]** (x 2 - 1,
so background depth is -1): RichDreamer's own ND-MV guidance maps its [0, 1] renders
x 2 - 1 before the model (threestudio/systems/nd_mvdream.py), as ldm maps every training
image to [-1, 1]. TriplaneTurbo feeds the [0, 1] renders unmapped, which moves the
background depth from -1 to 0 and halves every contrast the model was trained on; we
follow the model's training convention, not that shortcut.

Cameras. ND-MV conditions on the normalized c2w rotated by Rz(-90 deg) about the world's
z axis, its translation then scaled to 2 x the *relative* distance d tan(fov_y / 2)
(RichDreamer's "rel_x2" with rotate_z, used by its configs and by TriplaneTurbo). For our
Z-up cameras that equals ND's ``get_camera(elevation, azimuth, camera_distance=2 d_rel)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from renderers.cameras import Cameras
from teachers import multiview_unet as mv
from teachers.mvdream import (
    MultiViewDenoiser,
    load_text_encoder,
    load_unet,
    normalized_c2w,
    orbit_c2w,
)

RELEASED = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    use_checkpoint=False,
    legacy=False,
    camera_dim=16,
    use_fp16=False,
)
"""The UNet arguments of nd_mv_ema.ckpt (conv projections: use_linear_in_transformer
takes the constructor's default, False)."""

NUM_FRAMES = 4
DEPTH_RADIUS = 1.0
"""Half-extent r of the depth normalization's near / far = distance -+ r sqrt(3)
(RichDreamer's depth_norm_radius and TriplaneTurbo's renderers: 1)."""

_RZ_MINUS_90 = torch.tensor(
    [[0.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


def load_original(src, **ldm_kwargs) -> mv.MultiViewUNet:
    """ND-MV's UNet from an original checkpoint: a path or a state dict, flat or under
    "state_dict" (Lightning, as nd_mv_ema.ckpt); frozen, eval, fp32. ldm_kwargs: the
    original constructor's arguments (omitted ones take its defaults); none = ``RELEASED``."""
    return mv.load_original(src, ldm_kwargs or RELEASED)


def get_camera(
    num_frames: int,
    elevation: float = 15,
    azimuth_start: float = 0,
    azimuth_span: float = 360,
    blender_coord: bool = True,
    camera_distance: float = 1.0,
) -> Tensor:
    """(num_frames, 16) float32 row-major c2w as ND's ``camera_utils.get_camera``: MVDream's
    cameras at ``camera_distance`` from the origin."""
    if num_frames < 1:
        raise ValueError(f"get_camera: num_frames must be >= 1, got {num_frames}")
    az = azimuth_start + torch.arange(num_frames, dtype=torch.float64) * (azimuth_span / num_frames)
    return orbit_c2w(elevation, az, camera_distance, blender_coord).reshape(-1, 16).float()


def camera_condition(cameras: Cameras) -> Tensor:
    """(B, 16) ND-MV's camera rows for our cameras (module docstring), cameras' dtype."""
    c2w = _RZ_MINUS_90.to(cameras.c2w) @ normalized_c2w(cameras)
    d_rel = cameras.distance * torch.tan(torch.deg2rad(cameras.fov_y) / 2)
    c2w[:, :3, 3] = c2w[:, :3, 3] * (2 * d_rel)[:, None]
    return c2w.reshape(-1, 16)


def load_denoiser(
    pretrained: str | Path,
    text_encoder: str | Path,
    dtype=torch.float32,
    device=None,
    ldm_kwargs: dict | None = None,
) -> MultiViewDenoiser:
    """ND-MV as a frozen Denoiser on ``device`` in ``dtype``: pretrained is nd_mv_ema.ckpt
    or its ``prd convert`` folder; text_encoder an SD-1.5-style folder (text_encoder/ and
    tokenizer/ of CLIP ViT-L/14); ldm_kwargs: the UNet arguments of an original file that
    is not the released model. Inputs: (B, 4, 32, 32) in [-1, 1] (module docstring)."""
    for p in (pretrained, text_encoder):
        if not Path(p).exists():
            raise FileNotFoundError(f"RichDreamer ND-MV: {p} does not exist")
    unet = load_unet(pretrained, ldm_kwargs or RELEASED, dtype).to(device)
    encoder, tokenizer = load_text_encoder(text_encoder, dtype, device)
    return MultiViewDenoiser(unet, encoder, tokenizer, camera_condition, NUM_FRAMES)
