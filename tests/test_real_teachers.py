"""The three pretrained teachers in training: SD on the student's base folder, MVDream and
RichDreamer ND-MV from tiny checkpoints in the original layout (as the released files)."""

import math
from types import SimpleNamespace

import pytest
import torch
from test_multiview_unet import fill, original_layout
from test_train import sd_teacher, tiny_cfg, train_keeping_teachers
from transformers import CLIPTextConfig, CLIPTextModel

from prd import checkpoint
from prd.pretrained_teachers import load
from prd.teacher_setup import REFERENCE_NEGATIVE_PROMPT, TeacherSpec, check_teachers
from prompts.tokenizer import build_clip_tokenizer
from teachers import multiview_unet as mv

TINY_MV = dict(
    in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2],
    attention_resolutions=[1, 2], num_res_blocks=1, num_head_channels=16,
    use_spatial_transformer=True, use_linear_in_transformer=True, context_dim=32,
    camera_dim=16,
)  # fmt: skip
"""MVDream's layout at the tiny student's sizes: context 32 = the tiny SD text encoder's."""
TINY_ND = dict(
    in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2],
    attention_resolutions=[1, 2], num_res_blocks=1, num_heads=8,
    use_spatial_transformer=True, context_dim=24, camera_dim=16,
)  # fmt: skip
"""ND-MV's layout, tiny: conv projections, 8 heads, its own 24-wide CLIP text encoder."""


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """(MVDream .pt as a flat dict, ND-MV .ckpt under "state_dict", ND's text folder)."""
    root = tmp_path_factory.mktemp("teachers")
    mv_cfg, nd_cfg = mv.unet_config(TINY_MV), mv.unet_config(TINY_ND)
    mvd = fill(mv.MultiViewUNet.build(mv_cfg), seed=3)
    nd = fill(mv.MultiViewUNet.build(nd_cfg), seed=4)
    torch.save(original_layout(mvd, mv_cfg), root / "mv.pt")
    torch.save({"state_dict": original_layout(nd, nd_cfg)}, root / "nd.ckpt")
    text = root / "clip_l"
    with torch.random.fork_rng():
        torch.manual_seed(5)
        config = CLIPTextConfig(
            vocab_size=49408, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, eos_token_id=49407,
        )  # fmt: skip
        CLIPTextModel(config).save_pretrained(text / "text_encoder")
    build_clip_tokenizer().save_pretrained(text / "tokenizer")
    return root / "mv.pt", root / "nd.ckpt", text


def three_teachers(sd_folder, files) -> list[str]:
    mv_file, nd_file, text = files
    overrides = [o for o in sd_teacher(sd_folder) if "enabled=false" not in o]
    return overrides + [
        "teachers.mvdream.source=pretrained",
        f"teachers.mvdream.pretrained={mv_file}",
        "teachers.richdreamer.source=pretrained",
        f"teachers.richdreamer.pretrained={nd_file}",
        f"teachers.richdreamer.text_encoder={text}",
        "teachers.richdreamer.depth_radius=1.0",  # RichDreamer's (the oracle preset's: 0.5)
    ]


def test_two_steps_with_the_three_pretrained_teachers(tmp_path, tiny_sd_folder, teacher_files):
    cfg = tiny_cfg(
        "train.steps=2", "mesh.enabled=true", *three_teachers(tiny_sd_folder, teacher_files)
    )
    cfg.teachers.mvdream.ldm_kwargs = dict(TINY_MV)
    cfg.teachers.richdreamer.ldm_kwargs = dict(TINY_ND)
    summary, teachers = train_keeping_teachers(cfg, tmp_path / "run")
    roles = {r.name: r for r in teachers}
    assert list(roles) == ["sd", "mvdream", "richdreamer"]
    sd, mvd, nd = roles["sd"], roles["mvdream"], roles["richdreamer"]
    # MVDream: the student's (SD 2.1's) text encoder, the SD teacher's VAE, one model for
    # both branches, the reference's negative prompt; ND-MV: pixel space, its own encoder
    assert mvd.denoiser.text_encoder is None and mvd.denoiser.text_fn is not None
    assert mvd.branches["mesh"].encode.__self__.vae is sd.denoiser.vae
    assert all(t.denoiser is mvd.denoiser for t in mvd.branches.values())
    assert mvd.branches["volume"].negative_prompt == REFERENCE_NEGATIVE_PROMPT
    assert nd.branches["mesh"].encode is None and nd.denoiser.text_encoder is not None
    assert nd.branches["mesh"].role.radius == 1.0  # the spec's depth range reaches the role
    assert nd.branches["mesh"].guidance.asd_shift_ratio == 0.1
    records = checkpoint.read_metrics(tmp_path / "run")
    assert summary["step"] == 2 and [r["step"] for r in records] == [1, 2]
    for r in records:
        for role in roles:
            got = {k: v for k, v in r["losses"].items() if k.startswith(f"{role}/")}
            assert set(got) == {f"{role}/{b}/k{k}" for b in ("volume", "mesh") for k in (1, 2)}
            assert all(math.isfinite(v) for v in got.values()), got
        assert 0 < r["grad_norm"] < float("inf")


def test_every_path_is_checked_before_anything_loads(tmp_path, tiny_sd_folder, teacher_files):
    mv_file, nd_file, text = teacher_files
    cfg = SimpleNamespace(
        sd=TeacherSpec(enabled=False),
        mvdream=TeacherSpec(pretrained=str(mv_file)),
        richdreamer=TeacherSpec(enabled=False),
    )
    # MVDream's latents need SD's VAE: none of its places has one
    with pytest.raises(FileNotFoundError, match="no SD VAE.*teachers.mvdream.vae"):
        check_teachers(cfg, None)
    check_teachers(cfg, str(tiny_sd_folder))  # the student's base folder has vae/
    cfg.mvdream.vae = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"teachers.mvdream.vae: {tmp_path} has no vae"):
        check_teachers(cfg, str(tiny_sd_folder))
    cfg.mvdream = TeacherSpec(pretrained=str(tmp_path))  # a folder, but not a converted one
    with pytest.raises(FileNotFoundError, match="has no unet/config.json"):
        check_teachers(cfg, str(tiny_sd_folder))
    cfg.mvdream = TeacherSpec(enabled=False)
    cfg.richdreamer = TeacherSpec(pretrained=str(nd_file))
    with pytest.raises(ValueError, match="richdreamer.text_encoder is not set"):
        check_teachers(cfg, None)
    cfg.richdreamer.text_encoder = str(text / "tokenizer")
    with pytest.raises(FileNotFoundError, match="text_encoder/config.json"):
        check_teachers(cfg, None)
    cfg.richdreamer.text_encoder = str(text)
    check_teachers(cfg, None)


def test_a_text_encoder_of_the_wrong_width_is_named(tiny_sd_folder, teacher_files):
    """ND-MV on the SD text encoder (32 wide, the UNet takes 24): refused by name."""
    cfg = tiny_cfg(*three_teachers(tiny_sd_folder, teacher_files))
    cfg.teachers.richdreamer.text_encoder = str(tiny_sd_folder)
    cfg.teachers.richdreamer.ldm_kwargs = dict(TINY_ND)
    with pytest.raises(ValueError, match="text states of width 24, its text encoder gives 32"):
        load("richdreamer", cfg.teachers, "cpu", None, {})
