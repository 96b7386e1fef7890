"""PETA, the Parameter-Efficient Triplane Adapter (PRD paper, Sec. 3.3), on a diffusers SD.

Parts (each switchable, all of rank ``rank``; base weights stay frozen):
- plane LoRA: a separate LoRA per plane on every self-attention (attn1) to_q/to_k/to_v/
  to_out.0 of the UNet (``PlaneLoRALinear``); plane i of every object uses adapter i;
- joint attention: attn1 attends over the planes of one object (``prd.attention``);
- cross-attention LoRA: one LoRA shared by all planes on attn2 to_q/to_k/to_v/to_out.0;
- UNet LoCon: LoRA on the UNet's convolutions (resnet conv1/conv2/shortcuts, down- and
  upsamplers): a k x k conv in -> rank then a 1x1 conv rank -> out (peft's LoRA Conv2d);
- VAE LoCon: the same on the VAE decoder's convolutions;
- VAE attention LoRA: LoRA on the VAE decoder mid-block attention's q/k/v/out.

Why the plane LoRA is our own module and not peft: peft's per-sample ``adapter_names=``
refuses training mode, and switching adapters with ``set_adapter`` in a loop over planes
turns off requires_grad of the other adapters (docs/architecture.md). ``PlaneLoRALinear`` holds
all planes' factors in two tensors and routes by the sample's position in the batch, so one
batched forward trains all planes with no mutable routing state (safe under gradient
checkpointing and DeepSpeed). The shared adapters use peft's LoRA layers unchanged.

Convolution counts: the reference's 64 UNet convs and 33 VAE-decoder convs are every conv
except conv_in / conv_out (SD 2.1 has 66 and 35 in all); we follow those counts. The
decoder's conv_out is replaced by a new, fully trained conv (``prd.student``), and the
1x1 post_quant_conv in front of the decoder stays frozen without adapter.

Size for SD 2.1-base at rank 16 (meta-device count, ``prd.student.count_parameters``):
22,661,184 trainable = 2.48% of the 915,397,464 frozen UNet + VAE-decoder parameters
(plane LoRA 9.58M, cross-attention 1.72M, UNet LoCon 9.26M, VAE LoCon 1.96M, VAE attention
0.07M, new conv_out 0.07M), matching the reference's "about 22.7M, 2.5%".
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from prd.attention import JointPlaneAttnProcessor, set_joint_attention

ATTN_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class PetaConfig:
    """Which PETA parts to add, and their rank."""

    rank: int = 16
    """LoRA rank of every adapter (reference: 16)."""
    alpha: float = 16.0
    """LoRA alpha; adapter outputs are scaled by alpha / rank."""
    planes: int = 6
    """Planes per object (3 geometry + 3 texture); one self-attention adapter per plane."""
    plane_lora: bool = True
    """Per-plane LoRA on the UNet's self-attention projections."""
    joint_attention: bool = True
    """Self-attention joint over the planes of one object (False: per plane)."""
    cross_attn_lora: bool = True
    """One shared LoRA on the UNet's cross-attention projections."""
    unet_conv_lora: bool = True
    """LoCon on the UNet's convolutions (all but conv_in / conv_out)."""
    vae_conv_lora: bool = True
    """LoCon on the VAE decoder's convolutions (all but conv_in / conv_out)."""
    vae_attn_lora: bool = True
    """LoRA on the VAE decoder's mid-block attention projections."""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        if self.planes < 1:
            raise ValueError(f"planes must be >= 1, got {self.planes}")


class PlaneLoRALinear(nn.Module):
    """A frozen linear layer plus one LoRA per plane, routed by batch position.

    y[n] = base(x[n]) + (alpha / rank) * B[p] @ A[p] @ x[n] with p = n % planes.
    A: (P, rank, in), Kaiming-uniform per plane like peft; B: (P, out, rank), zero, so a
    new adapter leaves the base output unchanged. The factors are created in fp32 on the
    base weight's device, whatever the base dtype. With ``enabled`` False the layer is its
    base (``base_model``).
    """

    def __init__(self, base: nn.Linear, planes: int, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.planes, self.rank, self.scaling = planes, rank, alpha / rank
        self.enabled = True
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(planes, rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(planes, base.out_features, rank, device=dev))
        for a in self.lora_A.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, ..., in) with N a multiple of planes -> (N, ..., out)."""
        y = self.base(x)
        if not self.enabled:
            return y
        n = x.shape[0]
        if n % self.planes:
            raise ValueError(f"PlaneLoRALinear: batch {n} is not a multiple of {self.planes}")
        xp = x.reshape(n // self.planes, self.planes, -1, x.shape[-1]).to(self.lora_A.dtype)
        h = torch.einsum("bpli,pri->bplr", xp, self.lora_A)
        d = torch.einsum("bplr,por->bplo", h, self.lora_B) * self.scaling
        return y + d.reshape(y.shape).to(y.dtype)

    def single_plane(self, plane: int) -> PlaneLoRALinear:
        """A one-plane copy holding plane ``plane``'s factors (cloned) and the same base."""
        one = PlaneLoRALinear(self.base, 1, self.rank, self.scaling * self.rank)
        one.lora_A.data = self.lora_A.data[plane : plane + 1].clone()
        one.lora_B.data = self.lora_B.data[plane : plane + 1].clone()
        return one


@dataclass
class PetaModules:
    """Names of the modules PETA changed, per part (relative to the UNet / decoder)."""

    plane_lora: list[str] = field(default_factory=list)
    joint_attention: list[str] = field(default_factory=list)
    cross_attn_lora: list[str] = field(default_factory=list)
    unet_conv_lora: list[str] = field(default_factory=list)
    vae_conv_lora: list[str] = field(default_factory=list)
    vae_attn_lora: list[str] = field(default_factory=list)


def _attention_projections(model: nn.Module, suffix: str | None) -> list[str]:
    """Full names of q/k/v/out linears of the Attention modules (whose name ends in suffix)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and (suffix is None or name.split(".")[-1] == suffix):
            names += [f"{name}.{p}" for p in ATTN_PROJECTIONS]
    return names


def _inner_convs(model: nn.Module) -> list[str]:
    """Full names of the Conv2d layers except the top-level conv_in / conv_out."""
    skip = {"conv_in", "conv_out"}
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and name not in skip
    ]


def _inject_lora(model: nn.Module, targets: list[str], cfg: PetaConfig) -> None:
    """peft LoRA (zero-init B) on exactly the named Linear / Conv2d modules."""
    if not targets:
        return
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets)
    inject_adapter_in_model(lora, model)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def apply_peta(unet: nn.Module, vae_decoder: nn.Module, cfg: PetaConfig) -> PetaModules:
    """Add PETA to a diffusers UNet2DConditionModel and VAE Decoder, in place.

    Freezes every pre-existing parameter of both; only the adapters require grad (fp32).
    Returns the names of the modules changed per part.
    """
    for p in list(unet.parameters()) + list(vae_decoder.parameters()):
        p.requires_grad_(False)
    added = PetaModules()
    if cfg.cross_attn_lora:
        added.cross_attn_lora = _attention_projections(unet, "attn2")
    if cfg.unet_conv_lora:
        added.unet_conv_lora = _inner_convs(unet)
    _inject_lora(unet, added.cross_attn_lora + added.unet_conv_lora, cfg)
    if cfg.vae_attn_lora:
        added.vae_attn_lora = _attention_projections(vae_decoder.mid_block, None)
        added.vae_attn_lora = [f"mid_block.{n}" for n in added.vae_attn_lora]
    if cfg.vae_conv_lora:
        added.vae_conv_lora = _inner_convs(vae_decoder)
    _inject_lora(vae_decoder, added.vae_attn_lora + added.vae_conv_lora, cfg)
    # After peft: its injection freezes every parameter whose name lacks "lora_".
    if cfg.plane_lora:
        added.plane_lora = _attention_projections(unet, "attn1")
        for name in added.plane_lora:
            base = unet.get_submodule(name)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"{name}: expected nn.Linear, got {type(base).__name__}")
            _set_module(unet, name, PlaneLoRALinear(base, cfg.planes, cfg.rank, cfg.alpha))
    added.joint_attention = set_joint_attention(unet, cfg.planes, cfg.joint_attention)
    for group in peta_parameter_groups(unet, vae_decoder, added).values():
        for p in group:
            p.data = p.data.float()
            p.requires_grad_(True)
    return added


def peta_parameter_groups(
    unet: nn.Module, vae_decoder: nn.Module, added: PetaModules
) -> dict[str, list[nn.Parameter]]:
    """The adapter parameters of each PETA part (keys: the PetaModules field names)."""

    def adapter_params(root: nn.Module, names: list[str]) -> list[nn.Parameter]:
        params = []
        for name in names:
            module = root.get_submodule(name)
            if isinstance(module, PlaneLoRALinear):
                params += [module.lora_A, module.lora_B]
            elif isinstance(module, LoraLayer):
                params += list(module.lora_A.parameters()) + list(module.lora_B.parameters())
            else:
                raise TypeError(f"{name}: no adapter found on a {type(module).__name__}")
        return params

    return {
        "plane_lora": adapter_params(unet, added.plane_lora),
        "cross_attn_lora": adapter_params(unet, added.cross_attn_lora),
        "unet_conv_lora": adapter_params(unet, added.unet_conv_lora),
        "vae_conv_lora": adapter_params(vae_decoder, added.vae_conv_lora),
        "vae_attn_lora": adapter_params(vae_decoder, added.vae_attn_lora),
    }


@contextmanager
def base_model(unet: nn.Module) -> Iterator[nn.Module]:
    """Run a PETA UNet as its pretrained base inside the block: every adapter off (plane
    LoRA, peft LoRA / LoCon) and each joint-plane self-attention back to diffusers' default
    processor (any batch size), as the model was loaded. On exit the adapters, processors
    and every parameter's requires_grad are restored exactly (peft's switch also clears
    requires_grad of the adapters it turns off).

    A frozen teacher that shares the student's base weights calls the UNet in here.
    """
    planes = [m for m in unet.modules() if isinstance(m, PlaneLoRALinear)]
    peft_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    was_enabled = [m.enabled for m in planes]
    was_disabled = [m.disable_adapters for m in peft_layers]
    requires_grad = [(p, p.requires_grad) for p in unet.parameters()]
    processors = unet.attn_processors
    base = {
        name: AttnProcessor2_0() if isinstance(proc, JointPlaneAttnProcessor) else proc
        for name, proc in processors.items()
    }
    try:
        for m in planes:
            m.enabled = False
        for m in peft_layers:
            m.enable_adapters(False)
        unet.set_attn_processor(base)
        yield unet
    finally:
        for m, enabled in zip(planes, was_enabled):
            m.enabled = enabled
        for m, disabled in zip(peft_layers, was_disabled):
            m.enable_adapters(not disabled)
        unet.set_attn_processor(processors)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
