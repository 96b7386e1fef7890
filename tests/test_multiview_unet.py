"""The multi-view UNet (teachers.multiview_unet): key maps, loading, joint-view attention."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from teachers import multiview_unet as mv
from teachers import mvdream, richdreamer

DATA = Path(__file__).parent / "data" / "mvdream_parity"
TINY_MV = json.loads((DATA / "meta.json").read_text())["constructor_kwargs"]
"""MVDream's layout, tiny: linear projections, 16-channel heads (the parity checkpoint's)."""
TINY_ND = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[1, 2],
    num_res_blocks=[1, 2],
    channel_mult=[1, 2],
    num_heads=8,
    use_spatial_transformer=True,
    context_dim=24,
    camera_dim=16,
)
"""ND-MV's layout, tiny: 8 heads, conv projections (use_linear_in_transformer default)."""


def fill(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random, zero-initialised ones too (norms near 1, weights ~1/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name and p.ndim == 1
            if is_norm and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def tiny(ldm_kwargs, seed=0) -> mv.MultiViewUNet:
    return fill(mv.MultiViewUNet.build(mv.unet_config(ldm_kwargs)), seed).eval()


def original_layout(model, cfg, extra=True) -> dict:
    """A checkpoint in the original layout (inverse converter), with unrelated keys."""
    sd = {mv.PREFIX + k: v.clone() for k, v in mv.diffusers_to_ldm(model.state_dict(), cfg).items()}
    if extra:
        sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2, 3, 3, 3)
        sd["cond_stage_model.model.token_embedding.weight"] = torch.zeros(5, 4)
        sd["betas"] = torch.zeros(10)
    return sd


def inputs(n=8, size=8, context=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, generator=gen)
    c = torch.randn(n, 77, context, generator=gen)
    t = torch.tensor([999, 999, 999, 999, 500, 500, 500, 500][:n])
    cam = torch.cat([mvdream.get_camera(4, 15, 0), mvdream.get_camera(4, 30, 45)])[:n]
    return x, t, c, cam


def test_ldm_keys_are_the_original_checkpoints():
    cfg = mv.unet_config(TINY_MV)
    model = mv.MultiViewUNet.build(cfg)
    original = torch.load(DATA / "ckpt.pt", weights_only=True)
    ours = {
        mv.PREFIX + k: tuple(v.shape)
        for k, v in mv.diffusers_to_ldm(model.state_dict(), cfg).items()
    }
    assert ours == {k: tuple(v.shape) for k, v in original.items()}


@pytest.mark.parametrize("kwargs", [TINY_MV, TINY_ND], ids=["mvdream", "nd"])
def test_round_trip_is_exact(kwargs):
    cfg = mv.unet_config(kwargs)
    model = tiny(kwargs)
    ckpt = {"state_dict": original_layout(model, cfg), "epoch": 3}
    back = mv.load_original(ckpt, kwargs)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in back.parameters()) and not back.training
    ldm = mv.diffusers_to_ldm(a, cfg)
    assert mv.ldm_to_diffusers(ldm, cfg).keys() == a.keys()


def test_nd_layout_conv_projections_and_8_heads():
    model = tiny(TINY_ND)
    blocks = [m for m in model.modules() if isinstance(m, Attention)]
    assert blocks and all(b.heads == 8 for b in blocks)
    proj = model.down_blocks[0].attentions[0].proj_in
    assert isinstance(proj, torch.nn.Conv2d) and proj.kernel_size == (1, 1)
    assert isinstance(tiny(TINY_MV).down_blocks[1].attentions[0].proj_in, torch.nn.Linear)
    cfg = mv.unet_config(richdreamer.RELEASED)
    assert cfg["attention_head_dim"] == [8] * 4 and not cfg["use_linear_projection"]
    assert cfg["cross_attention_dim"] == 768
    cfg = mv.unet_config(mvdream.RELEASED)
    assert cfg["attention_head_dim"] == [5, 10, 20, 20] and cfg["use_linear_projection"]
    assert cfg["cross_attention_dim"] == 1024 and cfg["projection_class_embeddings_input_dim"] == 16


def test_one_frame_equals_stock_diffusers_unet():
    model = tiny(TINY_MV)
    stock = UNet2DConditionModel(**mv.unet_config(TINY_MV)).eval()
    stock.load_state_dict(model.state_dict())
    x, t, c, cam = inputs()
    with torch.no_grad():
        ours = model(x, timesteps=t, context=c, camera=cam, num_frames=1)
        ref = stock(x, t, encoder_hidden_states=c, class_labels=cam).sample
        # no camera: the stock UNet without its class embedding
        none = model(x, timesteps=t, context=c, camera=None, num_frames=1)
        plain_cfg = dict(mv.unet_config(TINY_MV), class_embed_type=None)
        plain_cfg["projection_class_embeddings_input_dim"] = None
        plain = UNet2DConditionModel(**plain_cfg).eval()
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith("class_embedding")}
        plain.load_state_dict(sd)
        ref_none = plain(x, t, encoder_hidden_states=c).sample
        zero = model(x, timesteps=t, context=c, camera=torch.zeros_like(cam), num_frames=1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(none, ref_none, atol=1e-5, rtol=0)
    assert (none - zero).abs().max() > 1e-2  # None skips the MLP; a zero camera does not


def test_joint_attention_equals_naive_per_object_loop():
    gen = torch.Generator().manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, processor=mv.JointViewAttnProcessor())
    fill(attn, 3)
    h = torch.randn(6, 5, 16, generator=gen)  # 2 objects x 3 views, 5 tokens each
    with torch.no_grad():
        got = attn(h, num_frames=3)
        want = []
        for obj in h.view(2, 15, 16):  # naive: softmax attention over the object's 15 tokens
            q, k, v = attn.to_q(obj), attn.to_k(obj), attn.to_v(obj)
            q, k, v = (t.view(15, 2, 8).transpose(0, 1) for t in (q, k, v))
            w = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1)
            want.append(attn.to_out[0]((w @ v).transpose(0, 1).reshape(15, 16)))
        ctx = torch.randn(6, 7, 16, generator=gen)
        cross = attn(h, encoder_hidden_states=ctx, num_frames=3)
        per_view = attn(h, encoder_hidden_states=ctx, num_frames=1)
    torch.testing.assert_close(got, torch.cat(want).view(6, 5, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(cross, per_view, atol=0, rtol=0)


def test_views_of_an_object_are_contiguous():
    model = tiny(TINY_MV)
    x, t, c, cam = inputs()
    with torch.no_grad():
        both = model(x, timesteps=t, context=c, camera=cam, num_frames=4)
        alone = model(x[:4], timesteps=t[:4], context=c[:4], camera=cam[:4], num_frames=4)
        fb = torch.arange(8).view(2, 4).t().reshape(-1)  # (f b) order: views interleaved
        inv = torch.argsort(fb)
        wrong = model(x[fb], timesteps=t[fb], context=c[fb], camera=cam[fb], num_frames=4)[inv]
        single = model(x, timesteps=t, context=c, camera=cam, num_frames=1)
    torch.testing.assert_close(both[:4], alone, atol=1e-5, rtol=0)
    assert (wrong - both).abs().max() > 1e-2
    assert (single - both).abs().max() > 1e-2


@pytest.mark.parametrize(
    "bad",
    [
        dict(use_scale_shift_norm=True),
        dict(resblock_updown=True),
        dict(num_classes=10),
        dict(use_fp16=True),
        dict(use_spatial_transformer=False),
        dict(disable_middle_self_attn=True),
        dict(context_dim=[32, 32]),
        dict(flash_attention=True),
        dict(num_head_channels=12),
    ],
)
def test_unsupported_ldm_kwargs_raise(bad):
    with pytest.raises(
        ValueError, match=next(iter(bad)) if "context" not in str(bad) else "context"
    ):
        mv.unet_config({**TINY_MV, **bad})


def test_accepted_and_ignored_kwargs_and_defaults():
    base = mv.unet_config(TINY_MV)
    same = dict(TINY_MV, image_size=64, use_checkpoint=True, legacy=True, use_fp16=False)
    assert {k: v for k, v in mv.unet_config(same).items() if k != "sample_size"} == {
        k: v for k, v in base.items() if k != "sample_size"
    }
    without = {k: v for k, v in TINY_ND.items() if k != "model_channels"}
    with pytest.raises(ValueError, match="model_channels"):
        mv.unet_config(without)
    # omitted optional arguments take the original's defaults: channel_mult (1, 2, 4, 8)
    cfg = mv.unet_config(
        {k: v for k, v in TINY_ND.items() if k not in ("channel_mult", "num_res_blocks")}
        | {"num_res_blocks": 1}
    )
    assert cfg["block_out_channels"] == [32, 64, 128, 256]


def test_load_from_file_flat_and_nested(tmp_path):
    cfg = mv.unet_config(TINY_ND)
    model = tiny(TINY_ND, seed=5)
    flat = original_layout(model, cfg)
    torch.save(flat, tmp_path / "flat.pt")
    torch.save({"state_dict": flat, "global_step": 7}, tmp_path / "nested.ckpt")
    x, t, _, cam = inputs(n=4)
    c = torch.randn(4, 77, 24)
    with torch.no_grad():
        want = model(x, timesteps=t, context=c, camera=cam, num_frames=4)
        for src in (tmp_path / "flat.pt", tmp_path / "nested.ckpt", str(tmp_path / "flat.pt")):
            got = richdreamer.load_original(src, **TINY_ND)(
                x, timesteps=t, context=c, camera=cam, num_frames=4
            )
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_load_is_strict_within_the_unet():
    cfg = mv.unet_config(TINY_MV)
    sd = original_layout(tiny(TINY_MV), cfg)
    key = mv.PREFIX + "input_blocks.1.1.proj_out.weight"
    with pytest.raises(KeyError, match="input_blocks.1.1.proj_out.weight"):
        mv.load_original({k: v for k, v in sd.items() if k != key}, TINY_MV)
    with pytest.raises(KeyError, match="no counterpart"):
        mv.load_original({**sd, mv.PREFIX + "label_emb.weight": torch.zeros(3)}, TINY_MV)
    with pytest.raises(ValueError, match="shape"):
        mv.load_original({**sd, key: torch.zeros(3, 3)}, TINY_MV)
    with pytest.raises(ValueError, match="no key under"):
        mv.load_original({"first_stage_model.x": torch.zeros(1)}, TINY_MV)
    with pytest.raises(KeyError):  # checkpoint of another configuration
        mv.load_original(sd, dict(TINY_MV, num_res_blocks=2))


def test_forward_refuses_plain_processors():
    model = mv.MultiViewUNet(**mv.unet_config(TINY_MV))  # built without MultiViewUNet.build
    x, t, c, cam = inputs()
    with pytest.raises(ValueError, match="JointViewAttnProcessor"):
        model(x, timesteps=t, context=c, camera=cam, num_frames=4)
    with pytest.raises(ValueError, match="multiple of num_frames"):
        tiny(TINY_MV)(x[:6], timesteps=t[:6], context=c[:6], camera=cam[:6], num_frames=4)
