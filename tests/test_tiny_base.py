"""``prd tiny-base``: the in-code pretrained stand-in for SD 2.1 (tiny arch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import prd.tiny_base as tb
from prd.config import load
from prd.model import build_model
from teachers.scenes import HELDOUT_PROMPTS, TRAIN_PROMPTS

REPO = Path(__file__).resolve().parents[1]
FAST = tb.Recipe(views=4, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4)


def test_timesteps_put_the_asked_share_in_the_top_of_the_schedule():
    gen = torch.Generator().manual_seed(0)
    assert tb.draw_timesteps(4000, 1000, 0.0, gen).min() >= 0
    assert tb.draw_timesteps(4000, 1000, 1.0, gen).min() >= 700
    t = tb.draw_timesteps(40000, 1000, 0.5, gen)
    assert t.max() <= 999
    # half from [700, 1000), half uniform (30% of which also lands there): 0.5 + 0.5 * 0.3
    assert (t >= 700).float().mean().item() == pytest.approx(0.65, abs=0.01)


def test_prd_tiny_base_renders_every_training_scene_and_no_held_out_one(tmp_path, monkeypatch):
    """``prd tiny-base`` end to end (2 optimizer steps each): every scene the builder renders
    for its dataset, recorded at the renderer, is a training scene, each on the grey
    background, and every training scene is shown."""
    from prd import cli
    from teachers.scenes import COLORS, parse_prompt, scene_color

    rendered: list[tuple[str, tuple[float, ...], tuple[float, ...]]] = []
    real = tb.render_scenes

    def recording(shapes, colors, cameras, size, background, *args, **kwargs):
        for shape, color in zip(shapes, colors.tolist()):
            rendered.append((shape, tuple(color), tuple(background)))
        return real(shapes, colors, cameras, size, background, *args, **kwargs)

    monkeypatch.setattr(tb, "render_scenes", recording)
    argv = ["tiny-base", "--out", str(tmp_path / "base"), "--views", "4", "--vae-steps", "2"]
    assert cli.main([*argv, "--unet-steps", "2", "--threads", "1"]) == 0
    assert (tmp_path / "base" / "unet").is_dir()
    by_scene = {(parse_prompt(p)[1], tuple(scene_color(p).tolist())): p for p in TRAIN_PROMPTS}
    held_out = {(parse_prompt(p)[1], tuple(scene_color(p).tolist())) for p in HELDOUT_PROMPTS}
    assert len(held_out) == len(HELDOUT_PROMPTS) == 6 and len(COLORS) == 6
    seen = {(shape, color) for shape, color, _ in rendered}
    assert not seen & held_out
    assert seen == set(by_scene)  # all 30 training scenes, 4 views each
    assert len(rendered) == 4 * len(TRAIN_PROMPTS)
    assert {bg for _, _, bg in rendered} == {(0.5, 0.5, 0.5)}


def test_build_writes_a_loadable_base_with_unit_std_latents(tmp_path):
    cfg = load([REPO / "configs/tiny.yaml"])
    out = tb.build_tiny_base(tmp_path / "base", cfg.cameras, FAST, log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no staging left

    # SD's convention: scaled latents of the training images have unit std
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    images, _ = tb.render_dataset(
        list(TRAIN_PROMPTS), FAST.views, cfg.cameras, torch.Generator().manual_seed(FAST.seed)
    )
    assert tb.encode(vae, images).std().item() == pytest.approx(1.0, rel=1e-4)

    student_cfg = load(
        [REPO / "configs/tiny.yaml"],
        [f"student.pretrained={out}", "student.train_base=false", "student.denoiser_skip=false"],
    )
    model = build_model(student_cfg, seed=0)
    text = model.student.encode_text(["a red cube", "a red cube", "a blue cone"])
    assert torch.equal(text[0], text[1]) and not torch.allclose(text[0], text[2])
    assert torch.equal(model.student.unet.conv_in.weight, _unet_of(out).conv_in.weight)
    # ... and a valid SD teacher folder: the same text states, its UNet as the student's base
    from teachers.sd import load_pretrained

    teacher = load_pretrained(out)
    assert torch.equal(teacher.encode_text(["a red cube"])[0], text[0])
    assert teacher.prediction_type == "epsilon" and teacher.downsampling() == 4

    with pytest.raises(FileExistsError, match="exists"):
        tb.build_tiny_base(out, cfg.cameras, FAST, log=lambda s: None)


def test_a_failed_build_leaves_no_folder(tmp_path, monkeypatch):
    cfg = load([REPO / "configs/tiny.yaml"])
    monkeypatch.setattr(tb, "sd_scheduler", lambda: _Unsavable())
    with pytest.raises(KeyboardInterrupt):
        tb.build_tiny_base(tmp_path / "base", cfg.cameras, FAST, log=lambda s: None)
    assert not (tmp_path / "base").exists()


class _Unsavable:
    """A scheduler stand-in whose save is interrupted (the last write of a build)."""

    def __init__(self):
        from prd.arch import sd_scheduler

        self.alphas_cumprod = sd_scheduler().alphas_cumprod

    def save_pretrained(self, path):
        raise KeyboardInterrupt


def _unet_of(folder: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")


def test_text_state_cosine_compares_only_prompts_whose_word_differs():
    prompts = ["a red cube", "a red cone", "a blue cube"]
    text = torch.zeros(3, 77, 2)
    text[:, 2] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # the colour word's states
    # colour differs only in (0, 2) and (1, 2): cosines 1/sqrt(2), both ways
    assert tb.text_state_cosine(text, prompts, 1) == pytest.approx(2**-0.5)
    text[:, 3] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # the shape word's
    assert tb.text_state_cosine(text, prompts, 2) == pytest.approx(0.0)


def test_frozen_text_encoder_has_the_asked_token_std_and_separates_words_more():
    from prd.arch import encode_prompts
    from prompts.tokenizer import build_clip_tokenizer

    tokenizer, prompts = build_clip_tokenizer(), list(TRAIN_PROMPTS)
    cosines = []
    for std in (0.02, 0.3):
        encoder = tb.frozen_text_encoder(std, torch.Generator().manual_seed(0))
        weight = encoder.get_input_embeddings().weight
        assert weight.std().item() == pytest.approx(std, rel=0.01)
        assert not any(p.requires_grad for p in encoder.parameters())
        cosines.append(
            tb.text_state_cosine(encode_prompts(tokenizer, encoder, prompts), prompts, 1)
        )
    assert cosines[1] < cosines[0] - 0.1


def test_recipe_rejects_bad_values():
    with pytest.raises(ValueError, match="views"):
        tb.Recipe(views=0)
    with pytest.raises(ValueError, match="high_t_share"):
        tb.Recipe(high_t_share=1.5)
    with pytest.raises(ValueError, match="text_token_std"):
        tb.Recipe(text_token_std=0.0)
