"""What an SD base is: the in-code architectures (SD 2.1-base and a tiny one at CPU size),
SD's training schedule, its prompt encoding, and the diffusers-format folder of
pretrained weights that the student (and, later, the teachers) load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

ARCHS = ("tiny", "sd21")
TEXT_LENGTH = 77
# Files of a diffusers-format SD folder that the student reads; "a | b": either one (the
# hub's folders carry vocab.json + merges.txt, transformers 5 saves tokenizer.json).
PRETRAINED_FILES = (
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json | tokenizer/tokenizer.json",
    "tokenizer/merges.txt | tokenizer/tokenizer.json",
    "scheduler/scheduler_config.json",
)


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


@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]
) -> torch.Tensor:
    """prompts -> (B, 77, C_text) last hidden states, padded and truncated to 77 tokens as
    SD conditions on them; on the text encoder's device."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=TEXT_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state


def check_pretrained(folder: Path, arch: str) -> None:
    """FileNotFoundError naming the folder, or the files it lacks, unless ``folder`` is a
    complete diffusers-format SD folder (``PRETRAINED_FILES``)."""
    if not folder.is_dir():
        hint = f"; `prd tiny-base --out {folder}` builds one" if arch == "tiny" else ""
        raise FileNotFoundError(
            f"student.pretrained: no folder {folder}{hint}; a diffusers-format "
            f"stable-diffusion-2-1-base folder has: {list(PRETRAINED_FILES)}"
        )
    missing = [
        f for f in PRETRAINED_FILES if not any((folder / a).is_file() for a in f.split(" | "))
    ]
    if missing:
        raise FileNotFoundError(
            f"pretrained SD folder {folder} is missing {missing}; a diffusers-format "
            f"stable-diffusion-2-1-base folder has: {list(PRETRAINED_FILES)}"
        )


def _damaged_file(folder: Path) -> str:
    """The first file of a model folder that does not open (a JSON file that does not
    parse, a safetensors file whose header or size is wrong), with the reason; "" if none."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text("utf-8"))
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open API)
                        f.get_slice(key)
        except (OSError, ValueError, SafetensorError) as exc:
            return f"{path}: {exc}"
    return ""


def _load_part(folder: Path, load):
    """``load()`` of one model of a pretrained folder; a damaged file (truncated weights,
    broken JSON) raises ValueError naming it instead of the loader's traceback."""
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, SafetensorError) as exc:
        bad = _damaged_file(folder) if folder.is_dir() else ""
        raise ValueError(f"pretrained folder {folder.parent}: {bad or f'{folder}: {exc}'}") from exc


def load_pretrained(folder: str | Path, arch: str, dtype: torch.dtype):
    """(tokenizer, text encoder, UNet, VAE, scheduler) of a diffusers-format SD folder, the
    UNet checked against ``arch``'s block and context widths (ValueError naming both); a
    damaged file of the folder raises ValueError naming it."""
    folder = Path(folder)
    check_pretrained(folder, arch)
    unet = _load_part(
        folder / "unet",
        lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
    )
    want = ARCH_CONFIGS[arch][0]
    for key in ("block_out_channels", "cross_attention_dim"):
        got, exp = unet.config[key], want[key]
        if (list(got) if isinstance(got, (list, tuple)) else got) != (
            list(exp) if isinstance(exp, (list, tuple)) else exp
        ):
            raise ValueError(f"{folder}/unet/config.json: {key}={got}, arch {arch} has {exp}")
    vae = _load_part(
        folder / "vae",
        lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
    )
    text = _load_part(
        folder / "text_encoder",
        lambda: CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype),
    )
    tokenizer = _load_part(
        folder / "tokenizer", lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer")
    )
    scheduler = _load_part(
        folder / "scheduler",
        lambda: DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )
    return tokenizer, text, unet, vae, scheduler
