"""``prd convert`` and the multi-view Denoisers built from an original file or its folder."""

import json
import re

import pytest
import torch
from diffusers import AutoencoderKL
from test_multiview_unet import TINY_MV, TINY_ND, fill, original_layout, tiny
from transformers import CLIPTextConfig, CLIPTextModel

from prd import cli
from prompts.tokenizer import build_clip_tokenizer
from renderers.cameras import orbit_cameras
from teachers import multiview_unet as mv
from teachers import mvdream, richdreamer

TINY_VAE = dict(
    block_out_channels=[32, 64],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    latent_channels=4,
)


def ldm_vae_keys(sd: dict, levels: int) -> dict:
    """diffusers AutoencoderKL names -> ldm AutoencoderKL names (1x1 convs in attention)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"down_blocks\.(\d+)\.resnets", r"down.\1.block", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets", lambda m: f"up.{levels - 1 - int(m[1])}.block", k)
        k = re.sub(
            r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{levels - 1 - int(m[1])}.upsample", k
        )
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace(
            "mid_block.resnets.1", "mid.block_2"
        )
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for a, b in attn.items():
            if f"mid_block.attentions.0.{a}." in k:
                k = k.replace(f"mid_block.attentions.0.{a}.", f"mid.attn_1.{b}.")
                if b != "norm" and k.endswith("weight"):
                    v = v[:, :, None, None]
        out["first_stage_model." + k] = v.clone()
    return out


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """An SD-style folder with a tiny CLIP text encoder (width 32) and CLIP's tokenizer."""
    root = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77,
    )  # fmt: skip
    CLIPTextModel(cfg).save_pretrained(root / "text_encoder")
    build_clip_tokenizer(root / "cache").save_pretrained(root / "tokenizer")
    return root


def test_convert_round_trip(tmp_path, text_folder):
    cfg = mv.unet_config(TINY_MV)
    model = tiny(TINY_MV, seed=2)
    vae = fill(AutoencoderKL(**TINY_VAE), 4).eval()
    ckpt = {**original_layout(model, cfg), **ldm_vae_keys(vae.state_dict(), 2)}
    torch.save(ckpt, tmp_path / "mv.pt")
    (tmp_path / "unet.json").write_text(json.dumps(TINY_MV))
    out = tmp_path / "conv"
    argv = ["convert", "mvdream", str(tmp_path / "mv.pt"), "--out", str(out)]
    assert cli.main(argv + ["--ldm-kwargs", str(tmp_path / "unet.json")]) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert cli.main(argv) == 2  # --out exists
    # the VAE: same tensors under diffusers' names, SD's scaling factor
    got_vae = AutoencoderKL.from_pretrained(out / "vae")
    assert got_vae.config.scaling_factor == mvdream.VAE_SCALING_FACTOR
    a, b = vae.state_dict(), got_vae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the UNet: the converted folder and the original file give the same eps
    from_file = mvdream.load_denoiser(tmp_path / "mv.pt", text_folder, ldm_kwargs=TINY_MV)
    from_dir = mvdream.load_denoiser(out, text_folder)
    cams = orbit_cameras(torch.arange(8.0) * 90 + 7, 20.0, 1.5)
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999] * 4 + [300] * 4)
    cond = from_file.encode_text(["a red chair"] * 4 + [""] * 4)
    with torch.no_grad():
        eps_file = from_file(x, t, cond, cams)
        eps_dir = from_dir(x, t, cond, cams)
        direct = model(
            x, timesteps=t, context=cond, camera=mvdream.camera_condition(cams), num_frames=4
        )
    torch.testing.assert_close(eps_dir, eps_file, atol=0, rtol=0)
    torch.testing.assert_close(eps_file, direct, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in from_dir.parameters())


def test_richdreamer_denoiser_and_convert(tmp_path, text_folder):
    nd = dict(TINY_ND, context_dim=32)
    model = tiny(nd, seed=3)
    torch.save({"state_dict": original_layout(model, mv.unet_config(nd))}, tmp_path / "nd.ckpt")
    out = tmp_path / "nd"
    from prd.convert import convert

    convert("richdreamer", tmp_path / "nd.ckpt", out, nd)
    assert sorted(p.name for p in out.iterdir()) == ["unet"]
    den = richdreamer.load_denoiser(out, text_folder)
    cams = orbit_cameras(torch.arange(4.0) * 90, 10.0, 1.6, fov_y=40.0)
    x = torch.rand(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    t = torch.tensor([500] * 4)
    cond = den.encode_text(["a blue torus"] * 4)
    with torch.no_grad():
        got = den(x, t, cond, cams)
        want = model(
            x, timesteps=t, context=cond, camera=richdreamer.camera_condition(cams), num_frames=4
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        den(x[:3], t[:3], cond[:3], cams.index(slice(0, 3)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        richdreamer.load_denoiser(tmp_path / "missing.ckpt", text_folder)
    with pytest.raises(FileNotFoundError, match="no text_encoder"):
        richdreamer.load_denoiser(out, tmp_path)
