"""PETA: joint plane attention, per-plane LoRA routing, frozen base, zero-init identity."""

import copy
import math

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from prd.arch import TINY_UNET, TINY_VAE
from prd.attention import JointPlaneAttnProcessor, set_joint_attention
from prd.peta import PetaConfig, PlaneLoRALinear, apply_peta, peta_parameter_groups

P = 6


def _randomize_lora_b(module: torch.nn.Module, seed: int = 0) -> None:
    """Nonzero B factors (zero at init) so that every adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def _tiny_unet(peta: PetaConfig | None):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    base = (copy.deepcopy(unet), copy.deepcopy(vae.decoder))
    added = apply_peta(unet, vae.decoder, peta) if peta is not None else None
    return unet, vae.decoder, added, base


def _inputs(objects: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(objects * P, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (objects * P,), generator=gen)
    ctx = torch.randn(objects, 77, 32, generator=gen).repeat_interleave(P, dim=0)
    return z, t, ctx


# -- joint attention -------------------------------------------------------------------


def _attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(query_dim=16, heads=2, dim_head=8, out_bias=True)


def test_joint_attention_matches_naive_reference():
    attn = _attention()
    attn.set_processor(JointPlaneAttnProcessor(P))
    x = torch.randn(2 * P, 5, 16)
    out = attn(x)
    for b in range(2):
        tokens = x[b * P : (b + 1) * P].reshape(P * 5, 16)  # planes concatenated in order
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        heads = []
        for h in range(2):
            sl = slice(8 * h, 8 * (h + 1))
            w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(8), dim=-1)
            heads.append(w @ v[:, sl])
        ref = attn.to_out[0](torch.cat(heads, dim=-1)).reshape(P, 5, 16)
        torch.testing.assert_close(out[b * P : (b + 1) * P], ref, atol=1e-5, rtol=1e-5)


def test_joint_attention_mixes_planes_of_one_object_only():
    attn = _attention()
    x = torch.randn(2 * P, 5, 16)
    y = x.clone()
    y[0] += 1.0  # perturb plane 0 of object 0
    attn.set_processor(JointPlaneAttnProcessor(P, joint=True))
    ox, oy = attn(x), attn(y)
    assert torch.equal(ox[P:], oy[P:]), "object 1 changed when object 0 was perturbed"
    assert (ox[1:P] - oy[1:P]).abs().amin(dim=(1, 2)).gt(0).all(), "planes of object 0 unmixed"
    attn.set_processor(JointPlaneAttnProcessor(P, joint=False))
    ox, oy = attn(x), attn(y)
    assert torch.equal(ox[1:], oy[1:]), "per-plane attention leaked across planes"


def test_joint_attention_is_set_on_self_attention_only():
    unet, _, added, _ = _tiny_unet(PetaConfig(rank=4))
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            is_joint = isinstance(module.processor, JointPlaneAttnProcessor)
            assert is_joint == name.endswith("attn1"), name
    assert len(added.joint_attention) == 7  # 2 down + 1 mid + 4 up transformer blocks


# -- per-plane LoRA ----------------------------------------------------------------------


def test_plane_lora_linear_follows_the_per_sample_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    layer = PlaneLoRALinear(base, P, rank=3, alpha=6.0)
    _randomize_lora_b(layer)
    x = torch.randn(2 * P, 4, 8)
    out = layer(x)
    for n in range(2 * P):
        p = n % P
        ref = base(x[n]) + 2.0 * x[n] @ layer.lora_A[p].T @ layer.lora_B[p].T
        torch.testing.assert_close(out[n], ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="multiple of 6"):
        layer(torch.randn(5, 4, 8))


def test_only_adapters_train_and_they_are_fp32():
    unet, decoder, added, _ = _tiny_unet(PetaConfig(rank=4))
    groups = peta_parameter_groups(unet, decoder, added)
    adapter_ids = {id(p) for g in groups.values() for p in g}
    assert all(len(g) > 0 for g in groups.values()), {k: len(g) for k, g in groups.items()}
    for module in (unet, decoder):
        for name, p in module.named_parameters():
            assert p.requires_grad == (id(p) in adapter_ids), name
            assert p.requires_grad == ("lora_" in name), name
            if p.requires_grad:
                assert p.dtype == torch.float32, name
    # tiny UNet: 9 resnets (2 convs each, 5 with shortcuts), 1 down-, 1 upsampler;
    # tiny decoder: 8 resnets (2 mid + 3 up blocks of 2; 1 shortcut), 2 upsamplers, 1 mid
    # attention (conv_in/out excluded)
    assert (len(added.unet_conv_lora), len(added.vae_conv_lora)) == (23, 19)
    assert len(added.vae_attn_lora) == 4


def test_zero_init_adapters_leave_the_base_output_unchanged():
    unet, decoder, _, (base_unet, base_decoder) = _tiny_unet(PetaConfig(joint_attention=False))
    z, t, ctx = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            unet(z, t, ctx).sample, base_unet(z, t, ctx).sample, atol=1e-6, rtol=1e-6
        )
        torch.testing.assert_close(decoder(z), base_decoder(z), atol=1e-6, rtol=1e-6)


def _plane_lora_layers(unet):
    return [m for m in unet.modules() if isinstance(m, PlaneLoRALinear)]


def test_plane_loss_reaches_only_its_own_adapter():
    """Joint attention off: plane i's outputs depend on adapter i and no other."""
    unet, _, _, _ = _tiny_unet(PetaConfig(joint_attention=False, rank=4))
    _randomize_lora_b(unet)
    z, t, ctx = _inputs()
    out = unet(z, t, ctx).sample
    layers = _plane_lora_layers(unet)
    assert len(layers) == 28  # 7 self-attentions x q/k/v/out
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    for plane in range(P):
        grads = torch.autograd.grad(out[plane::P].square().sum(), params, retain_graph=True)
        for grad in grads:
            per_plane = grad.flatten(1).abs().amax(dim=1)
            assert per_plane[plane] > 0
            others = torch.cat([per_plane[:plane], per_plane[plane + 1 :]])
            assert torch.equal(others, torch.zeros_like(others)), (plane, per_plane)


def test_joint_attention_carries_gradient_across_planes():
    unet, _, _, _ = _tiny_unet(PetaConfig(joint_attention=True, rank=4))
    _randomize_lora_b(unet)
    z, t, ctx = _inputs()
    unet(z, t, ctx).sample[0::P].square().sum().backward()
    grad = _plane_lora_layers(unet)[0].lora_A.grad
    assert grad.flatten(1).abs().amax(dim=1).gt(0).all()


def test_batched_routing_equals_six_single_plane_models():
    """One batched forward with plane routing == 6 forwards with one adapter each.

    In float64, so that the comparison sees routing errors rather than fp32 summation order.
    """
    unet, _, _, _ = _tiny_unet(PetaConfig(joint_attention=False, rank=4))
    unet.double()
    _randomize_lora_b(unet)
    z, t, ctx = (x.double() if x.is_floating_point() else x for x in _inputs())
    weight = torch.randn(z.shape, generator=torch.Generator().manual_seed(5)).double()
    out = unet(z, t, ctx).sample
    (out * weight).sum().backward()
    named = dict(unet.named_parameters())
    shared_sum = {n: torch.zeros_like(p) for n, p in named.items() if p.requires_grad}

    for plane in range(P):
        ref = copy.deepcopy(unet)
        ref.zero_grad()
        for name, module in list(ref.named_modules()):
            if isinstance(module, PlaneLoRALinear):
                parent, _, child = name.rpartition(".")
                setattr(ref.get_submodule(parent), child, module.single_plane(plane))
        set_joint_attention(ref, planes=1, joint=False)
        sl = slice(plane, None, P)
        ref_out = ref(z[sl], t[sl], ctx[sl]).sample
        (ref_out * weight[sl]).sum().backward()
        torch.testing.assert_close(out[sl], ref_out, atol=1e-10, rtol=0)
        for name, p in ref.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith(("lora_A", "lora_B")) and isinstance(
                ref.get_submodule(name.rpartition(".")[0]), PlaneLoRALinear
            ):
                torch.testing.assert_close(named[name].grad[plane], p.grad[0], atol=1e-10, rtol=0)
            else:
                shared_sum[name] += p.grad
    for name, g in shared_sum.items():
        if not isinstance(unet.get_submodule(name.rpartition(".")[0]), PlaneLoRALinear):
            torch.testing.assert_close(named[name].grad, g, atol=1e-10, rtol=0)
