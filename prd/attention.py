"""Self-attention joint over the planes of one object (PETA's only cross-plane mechanism).

The student's batch is object-major: sample n is plane ``n % planes`` of object
``n // planes``. The processor reshapes the tokens of an object's planes into one sequence,
``(B*P, L, C) -> (B, P*L, C)``, attends over it and splits it back, so every plane sees the
other planes of its object and no other object (docs/reference.md: 6 x 1024 = 6144 tokens
at the 32x32
level of SD 2.1). Cross-attention (attn2) keeps diffusers' per-sample processor.

The q/k/v/out projections are called on the per-plane ``(B*P, L, C)`` layout, so the
per-plane adapters of ``prd.peta.PlaneLoRALinear`` see the plane index of each sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class JointPlaneAttnProcessor:
    """diffusers attention processor: self-attention over all planes of one object.

    planes: number of planes per object P; the batch must be a multiple of P.
    joint: False attends within each plane only (the base model's self-attention); tests
        use it to isolate the per-plane adapters.
    """

    def __init__(self, planes: int, joint: bool = True):
        if planes < 1:
            raise ValueError(f"planes must be >= 1, got {planes}")
        self.planes = planes
        self.joint = joint

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: (B*P, L, C) -> (B*P, L, C)."""
        if encoder_hidden_states is not None:
            raise ValueError("JointPlaneAttnProcessor is for self-attention; got context tokens")
        if attention_mask is not None:
            raise ValueError("JointPlaneAttnProcessor does not support attention masks")
        if hidden_states.ndim != 3:
            raise ValueError(f"expected (B*P, L, C) tokens, got {tuple(hidden_states.shape)}")
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("JointPlaneAttnProcessor expects an attention without input norms")
        n, length, _ = hidden_states.shape
        if n % self.planes:
            raise ValueError(f"batch {n} is not a multiple of planes={self.planes}")
        residual = hidden_states

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        groups = n // self.planes if self.joint else n
        heads = attn.heads
        head_dim = key.shape[-1] // heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            # (B*P, L, H*D) -> (B, H, P*L, D): object-major rows make the planes of one
            # object contiguous, so a plain reshape concatenates their tokens in plane order.
            return x.reshape(groups, -1, heads, head_dim).transpose(1, 2)

        query, key, value = split_heads(query), split_heads(key), split_heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, scale=attn.scale)
        out = out.transpose(1, 2).reshape(n, length, heads * head_dim).to(query.dtype)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def set_joint_attention(unet: torch.nn.Module, planes: int, joint: bool = True) -> list[str]:
    """Set a JointPlaneAttnProcessor on every self-attention (``attn1``) of the UNet.

    Returns the module names changed. Cross-attention keeps its processor.
    """
    names = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.split(".")[-1] == "attn1":
            module.set_processor(JointPlaneAttnProcessor(planes, joint))
            names.append(name)
    if not names:
        raise ValueError("set_joint_attention: the UNet has no self-attention (attn1) modules")
    return names
