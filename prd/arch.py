"""What an SD base is: the in-code architectures (SD 2.1-base and a tiny one at CPU size),
SD's training schedule, and the checks of a diffusers-format folder of pretrained weights
that the student loads (the folder's format, prompt encoding and loading live with the SD
teacher, ``teachers.sd``, which reads the same folders).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from teachers.sd import TEXT_LENGTH, check_sd_folder, encode_prompts, load_parts

__all__ = [
    "ARCHS",
    "ARCH_CONFIGS",
    "TEXT_LENGTH",
    "check_pretrained",
    "encode_prompts",
    "load_pretrained",
    "sd_scheduler",
]

ARCHS = ("tiny", "sd21")


# stabilityai/stable-diffusion-2-1-base unet/config.json (architecture keys).
SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),  # number of heads (head dim 64), diffusers' naming
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
)
# Same block structure at CPU size; 2 and 4 heads of dim 16.
TINY_UNET = dict(
    SD21_UNET,
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
)
# stabilityai/stable-diffusion-2-1-base vae/config.json.
SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)
# Three decoder blocks: planes upsample x4 (8 -> 32), enough texels for the oracle scenes.
TINY_VAE = dict(
    SD21_VAE,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
)
# stable-diffusion-2-1-base text_encoder/config.json: OpenCLIP ViT-H text tower, last layer dropped.
SD21_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=TEXT_LENGTH,
    hidden_act="gelu",
    projection_dim=512,
    eos_token_id=49407,
)
TINY_TEXT = dict(SD21_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, projection_dim=32)  # fmt: skip
ARCH_CONFIGS = {
    "sd21": (SD21_UNET, SD21_VAE, SD21_TEXT),
    "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT),
}


def sd_scheduler() -> DDPMScheduler:
    """SD's DDPM training schedule: scaled_linear betas 0.00085..0.012, 1000 steps, eps."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def check_pretrained(folder: Path, arch: str) -> None:
    """FileNotFoundError naming the folder, or the files it lacks, unless ``folder`` is a
    complete diffusers-format SD folder (``teachers.sd.SD_FOLDER_FILES``); ValueError
    unless its UNet config has ``arch``'s block and context widths. Reads no weights."""
    folder = Path(folder)
    hint = f"; `prd tiny-base --out {folder}` builds one" if arch == "tiny" else ""
    check_sd_folder(folder, "student.pretrained", hint)
    config = UNet2DConditionModel.load_config(folder, subfolder="unet")
    want = ARCH_CONFIGS[arch][0]
    for key in ("block_out_channels", "cross_attention_dim"):
        got, exp = config[key], want[key]
        if (list(got) if isinstance(got, (list, tuple)) else got) != (
            list(exp) if isinstance(exp, (list, tuple)) else exp
        ):
            raise ValueError(f"{folder}/unet/config.json: {key}={got}, arch {arch} has {exp}")


def load_pretrained(folder: str | Path, arch: str, dtype: torch.dtype):
    """(tokenizer, text encoder, UNet, VAE, scheduler) of a diffusers-format SD folder,
    after ``check_pretrained``."""
    check_pretrained(Path(folder), arch)
    return load_parts(folder, dtype, "student.pretrained")
