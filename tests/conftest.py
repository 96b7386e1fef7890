"""Test-wide settings: one torch thread per process (CI boxes have 2 shared cores)."""

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TINY_TRAINING = [
    f"prompts.file={REPO / 'configs' / 'oracle_train_prompts.txt'}",
    "volume.resolution=16",
    "volume.patch_size=8",
    "volume.global_size=8",
    "volume.n_importance=0",
    "mesh.resolution=16",
    "mesh_grid=16",
    "train.torch_threads=1",
    "train.image_every=0",
]
"""Overrides shared by the tests that train at tiny size on CPU (test_train's ``TINY``,
test_config's first step of every preset, test_distill_tiny's ``SMALL``): small renders
and mesh grids, the oracle preset's prompts, one thread, no images. Each test adds its own
(samples per ray, batch, steps, teachers' renders, ...)."""


@pytest.fixture(scope="session")
def randomize_trainable():
    """A function that overwrites a model's trainable tensors, in place, with seeded noise
    of std ``scale`` (adapters away from their zero init) and returns the model."""

    def fill(model, seed: int, scale: float = 0.01):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        return model

    return fill


def write_tiny_sd(folder, prediction_type: str = "epsilon", seed: int = 0):
    """A random-weight SD-shaped diffusers folder at the tiny arch's sizes (UNet, VAE, CLIP
    text encoder, tokenizer files, scheduler), written with save_pretrained; returns it."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from prd.arch import TINY_TEXT, TINY_UNET, TINY_VAE, sd_scheduler
    from prompts.tokenizer import build_clip_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).save_pretrained(folder / "text_encoder")
        UNet2DConditionModel(**TINY_UNET).save_pretrained(folder / "unet")
        AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
    build_clip_tokenizer().save_pretrained(folder / "tokenizer")
    config = dict(sd_scheduler().config, prediction_type=prediction_type)
    DDPMScheduler.from_config(config).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny random SD folder (epsilon prediction), written once; tests only read it."""
    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "sd")


def curate_shards(tmp: Path, prompts: list[str]) -> Path:
    """``prompts`` written to a text file and curated into 4 shards (no near-dedup) under
    ``tmp / "out"``, the folder a PromptStream reads; returns it."""
    from prompts.config import CurateConfig
    from prompts.curate import curate

    (tmp / "p.txt").write_text("\n".join(prompts) + "\n")
    cfg = CurateConfig(shards=4, near_dedup=False, tokenizer_cache=str(tmp / "tok"))
    curate([tmp / "p.txt"], tmp / "out", cfg)
    return tmp / "out"
