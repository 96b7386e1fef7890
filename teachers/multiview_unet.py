"""The multi-view UNet of MVDream and RichDreamer ND-MV on diffusers blocks.

Both released models are one ldm class (``MultiViewUNetModel`` of bytedance/MVDream and
modelscope/normal-depth-diffusion) in two configurations. It is Stable Diffusion's UNet
plus two things, and both have a diffusers counterpart:

- a camera MLP, Linear(16, 4C) - SiLU - Linear(4C, 4C), added to the timestep embedding
  and skipped when no camera is given: ``class_embed_type="projection"``, whose
  ``class_embedding`` has exactly that shape (``MultiViewUNet.get_class_embed`` skips it
  for ``camera=None``, as the original does, rather than failing);
- self-attention joined over the F views of an object: tokens (B*F, L, C) are regrouped
  to (B, F*L, C) for attn1 only; cross-attention stays per view
  (``JointViewAttnProcessor``). Views of one object are contiguous in the batch.

The rest maps one to one: ldm ResBlocks are ``ResnetBlock2D`` (GroupNorm eps 1e-5),
``SpatialTransformer3D`` is ``Transformer2DModel`` (input GroupNorm eps 1e-6, LayerNorm
1e-5, GEGLU), the timestep embedding is [cos, sin] (``flip_sin_to_cos=True``,
``freq_shift=0``). ``ldm_to_diffusers`` / ``diffusers_to_ldm`` rename the checkpoint
keys; the map is built from the configuration, and both directions are strict.
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import Tensor

from teachers.files import torch_load

PREFIX = "model.diffusion_model."
"""Where the UNet's tensors live in an ldm checkpoint (LatentDiffusion.model.diffusion_model)."""

# The original constructor's defaults (MultiViewUNetModel.__init__ of both repositories).
LDM_DEFAULTS = dict(
    dropout=0.0,
    channel_mult=(1, 2, 4, 8),
    num_heads=-1,
    num_head_channels=-1,
    transformer_depth=1,
    context_dim=None,
    use_linear_in_transformer=False,
    camera_dim=None,
)
LDM_REQUIRED = (
    "in_channels",
    "model_channels",
    "out_channels",
    "num_res_blocks",
    "attention_resolutions",
)
LDM_IGNORED = ("image_size", "use_checkpoint", "legacy", "num_heads_upsample")
"""Accepted and without effect here: image_size is unused by the original, checkpointing
and ``legacy`` do not change the outputs (legacy only matters when a head count does not
divide the channels, which is refused below), num_heads_upsample only sizes the
non-transformer AttentionBlock."""
LDM_FIXED = dict(
    use_spatial_transformer=True,
    conv_resample=True,
    dims=2,
    use_fp16=False,
    use_bf16=False,
    num_classes=None,
    use_scale_shift_norm=False,
    resblock_updown=False,
    use_new_attention_order=False,
    n_embed=None,
    disable_self_attentions=None,
    num_attention_blocks=None,
    disable_middle_self_attn=False,
    adm_in_channels=None,
)
"""Options of the original constructor this port supports at one value only (what both
released models use); any other value raises."""

_RESNET = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)


def unet_config(ldm_kwargs: dict) -> dict:
    """The ``UNet2DConditionModel`` config equal to ``MultiViewUNetModel(**ldm_kwargs)``.

    ldm_kwargs: the original constructor's arguments (omitted optional ones take its
    defaults). Raises ValueError naming an unknown, missing or unsupported argument.
    """
    known = set(LDM_DEFAULTS) | set(LDM_REQUIRED) | set(LDM_IGNORED) | set(LDM_FIXED)
    unknown = sorted(set(ldm_kwargs) - known)
    if unknown:
        raise ValueError(f"multi-view UNet: unknown ldm argument(s) {unknown}")
    missing = [k for k in LDM_REQUIRED if k not in ldm_kwargs]
    if missing:
        raise ValueError(f"multi-view UNet: ldm argument(s) {missing} have no default; give them")
    for key, value in LDM_FIXED.items():
        if key in ldm_kwargs and ldm_kwargs[key] != value:
            raise ValueError(
                f"multi-view UNet: {key}={ldm_kwargs[key]!r} is not supported (only {value!r})"
            )
    a = {**LDM_DEFAULTS, **ldm_kwargs}
    mc, mult = int(a["model_channels"]), [int(m) for m in a["channel_mult"]]
    if a["context_dim"] is None or isinstance(a["context_dim"], (list, tuple)):
        raise ValueError(f"multi-view UNet: context_dim must be one int, got {a['context_dim']!r}")
    attn_levels = [2**i in set(a["attention_resolutions"]) for i in range(len(mult))]
    heads = []
    for m in mult:
        ch = mc * m
        h = ch // a["num_head_channels"] if a["num_head_channels"] != -1 else a["num_heads"]
        if h < 1 or ch % h or ch % 32:
            raise ValueError(
                f"multi-view UNet: {ch} channels do not split into {h} heads and 32 groups "
                f"(num_heads={a['num_heads']}, num_head_channels={a['num_head_channels']})"
            )
        heads.append(h)
    nrb = a["num_res_blocks"]
    layers = int(nrb) if isinstance(nrb, int) else [int(n) for n in nrb]
    if isinstance(layers, list) and len(layers) != len(mult):
        raise ValueError(f"multi-view UNet: num_res_blocks {nrb} needs {len(mult)} levels")
    cam = a["camera_dim"]
    return dict(
        sample_size=int(a.get("image_size", 32)),
        in_channels=int(a["in_channels"]),
        out_channels=int(a["out_channels"]),
        down_block_types=["CrossAttnDownBlock2D" if at else "DownBlock2D" for at in attn_levels],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=[
            "CrossAttnUpBlock2D" if at else "UpBlock2D" for at in reversed(attn_levels)
        ],
        block_out_channels=[mc * m for m in mult],
        layers_per_block=layers,
        transformer_layers_per_block=int(a["transformer_depth"]),
        # diffusers' historical name: per-level head COUNTS, as in SD 2's configs
        attention_head_dim=heads,
        cross_attention_dim=int(a["context_dim"]),
        use_linear_projection=bool(a["use_linear_in_transformer"]),
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        dropout=float(a["dropout"]),
        class_embed_type=None if cam is None else "projection",
        projection_class_embeddings_input_dim=None if cam is None else int(cam),
    )


def _module_map(cfg: dict) -> list[tuple[str, str, bool]]:
    """(ldm module prefix, diffusers module prefix, is a ResBlock) for every module."""
    n_lv = len(cfg["block_out_channels"])
    nrb = cfg["layers_per_block"]
    nrb = [nrb] * n_lv if isinstance(nrb, int) else nrb
    attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    out = [("time_embed.0", "time_embedding.linear_1", False)]
    out += [("time_embed.2", "time_embedding.linear_2", False)]
    if cfg["class_embed_type"] is not None:
        out += [("camera_embed.0", "class_embedding.linear_1", False)]
        out += [("camera_embed.2", "class_embedding.linear_2", False)]
    out += [("input_blocks.0.0", "conv_in", False)]
    k = 1
    for lv in range(n_lv):
        for j in range(nrb[lv]):
            out.append((f"input_blocks.{k}.0", f"down_blocks.{lv}.resnets.{j}", True))
            if attn[lv]:
                out.append((f"input_blocks.{k}.1", f"down_blocks.{lv}.attentions.{j}", False))
            k += 1
        if lv != n_lv - 1:
            out.append((f"input_blocks.{k}.0.op", f"down_blocks.{lv}.downsamplers.0.conv", False))
            k += 1
    out += [("middle_block.0", "mid_block.resnets.0", True)]
    out += [("middle_block.1", "mid_block.attentions.0", False)]
    out += [("middle_block.2", "mid_block.resnets.1", True)]
    k = 0
    for up, lv in enumerate(reversed(range(n_lv))):
        for j in range(nrb[lv] + 1):
            out.append((f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{j}", True))
            if attn[lv]:
                out.append((f"output_blocks.{k}.1", f"up_blocks.{up}.attentions.{j}", False))
            if lv and j == nrb[lv]:
                i = 2 if attn[lv] else 1
                up_conv = f"up_blocks.{up}.upsamplers.0.conv"
                out.append((f"output_blocks.{k}.{i}.conv", up_conv, False))
            k += 1
    out += [("out.0", "conv_norm_out", False), ("out.2", "conv_out", False)]
    return out


def _rename(sd: dict, cfg: dict, to_diffusers: bool) -> dict:
    table = []
    for ldm, dif, is_res in _module_map(cfg):
        src, dst = (ldm, dif) if to_diffusers else (dif, ldm)
        table.append((src + ".", dst + ".", is_res))
    table.sort(key=lambda e: -len(e[0]))  # longest prefix first: input_blocks.1 vs .10
    out = {}
    for key, value in sd.items():
        for src, dst, is_res in table:
            if key.startswith(src):
                rest = key[len(src) :]
                if is_res:
                    for a, b in _RESNET:
                        a, b = (a, b) if to_diffusers else (b, a)
                        if rest.startswith(a):
                            rest = b + rest[len(a) :]
                            break
                out[dst + rest] = value
                break
        else:
            raise KeyError(f"multi-view UNet: checkpoint key {key!r} has no counterpart")
    return out


def ldm_to_diffusers(sd: dict[str, Tensor], cfg: dict) -> dict[str, Tensor]:
    """UNet state dict, ldm names (without ``PREFIX``) -> diffusers names (same tensors).
    Transformer internals (attn1/attn2/ff/norm1-3, proj_in/out) share their names."""
    return _rename(sd, cfg, to_diffusers=True)


def diffusers_to_ldm(sd: dict[str, Tensor], cfg: dict) -> dict[str, Tensor]:
    """The inverse of ``ldm_to_diffusers`` (names without ``PREFIX``)."""
    return _rename(sd, cfg, to_diffusers=False)


class JointViewAttnProcessor:
    """Attention processor: self-attention over all views of an object, cross-attention
    per view (MVDream's BasicTransformerBlock3D: "(b f) l c -> b (f l) c" around attn1).

    ``num_frames`` arrives through ``cross_attention_kwargs``; the batch holds the F views
    of each object contiguously. Uses SDPA (differs from ldm's einsum by ~1e-6).
    """

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        num_frames: int = 1,
    ) -> Tensor:
        if attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("JointViewAttnProcessor: (N, L, C) tokens without a mask only")
        n, length, c = hidden_states.shape
        joint = encoder_hidden_states is None and num_frames > 1
        if joint:
            if n % num_frames:
                raise ValueError(f"batch of {n} is not a multiple of num_frames={num_frames}")
            hidden_states = hidden_states.reshape(n // num_frames, num_frames * length, c)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, h = q.shape[0], attn.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        return out.reshape(n, length, -1) if joint else out


class MultiViewUNet(UNet2DConditionModel):
    """diffusers' UNet with the camera MLP as its class embedding and joint-view attention.

    Call it as the original: ``unet(x, timesteps=t, context=c, camera=cam, num_frames=F)``
    -> eps (N, C_out, H, W) for x (N, C_in, H, W), t (N,) (kept in its dtype: a bf16 999
    rounds to 1000), c (N, L, context_dim), cam (N, camera_dim) or None (no camera term),
    N a multiple of F with the F views of an object contiguous. Build it with
    ``MultiViewUNet.build(config)`` or ``from_pretrained`` (both install the processors).
    """

    @classmethod
    def build(cls, config: dict) -> MultiViewUNet:
        model = cls(**config)
        model.set_attn_processor(JointViewAttnProcessor())
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> MultiViewUNet:
        model = super().from_pretrained(*args, **kwargs)
        model.set_attn_processor(JointViewAttnProcessor())
        return model

    def get_class_embed(self, sample: Tensor, class_labels: Tensor | None) -> Tensor | None:
        # the original adds camera_embed(camera) only when a camera is given;
        # camera_embed(0) is not 0, so "no camera" is not a zero camera
        if class_labels is None:
            return None
        return super().get_class_embed(sample, class_labels)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        camera: Tensor | None = None,
        num_frames: int = 1,
    ) -> Tensor:
        if x.shape[0] % num_frames:
            raise ValueError(f"batch {x.shape[0]} is not a multiple of num_frames={num_frames}")
        if camera is not None and self.class_embedding is None:
            raise ValueError("this multi-view UNet has no camera embedding (camera_dim=None)")
        procs = self.attn_processors.values()
        if num_frames > 1 and not all(isinstance(p, JointViewAttnProcessor) for p in procs):
            raise ValueError(
                "multi-view UNet: attention processors are not JointViewAttnProcessor; build it "
                "with MultiViewUNet.build or from_pretrained"
            )
        return (
            super()
            .forward(
                x,
                timesteps,
                encoder_hidden_states=context,
                class_labels=camera,
                cross_attention_kwargs={"num_frames": num_frames},
            )
            .sample
        )


def unet_state_dict(src) -> dict[str, Tensor]:
    """The UNet's tensors (ldm names, ``PREFIX`` removed) of an ldm checkpoint.

    src: a path (``torch.load(weights_only=True, mmap=True)``) or an in-memory dict; the
    dict may be flat or hold the tensors under "state_dict" (Lightning). Keys outside
    ``PREFIX`` (VAE, text encoder, schedule buffers, ...) are ignored.
    """
    name = "state dict"
    if not isinstance(src, dict):
        name = str(src)
        src = torch_load(src, map_location="cpu", weights_only=True, mmap=True)
    if "state_dict" in src and isinstance(src["state_dict"], dict):
        src = src["state_dict"]
    sd = {k[len(PREFIX) :]: v for k, v in src.items() if k.startswith(PREFIX)}
    if not sd:
        raise ValueError(f"{name}: no key under {PREFIX!r} (not an ldm checkpoint of a UNet)")
    return sd


def load_original(src, ldm_kwargs: dict) -> MultiViewUNet:
    """A frozen fp32 ``MultiViewUNet`` (eval) from an original checkpoint ``src`` (see
    ``unet_state_dict``) built with ``MultiViewUNetModel(**ldm_kwargs)``'s layout; every
    UNet tensor must be present and used (KeyError naming the keys otherwise)."""
    cfg = unet_config(ldm_kwargs)
    model = MultiViewUNet.build(cfg)
    sd = ldm_to_diffusers(unet_state_dict(src), cfg)
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise KeyError(
            f"multi-view UNet checkpoint: missing {[ldm_name(m, cfg) for m in missing]}, "
            f"unexpected {unexpected} (is ldm_kwargs the checkpoint's configuration?)"
        )
    for key, value in sd.items():
        if value.shape != want[key].shape:
            raise ValueError(
                f"multi-view UNet checkpoint: {PREFIX}{ldm_name(key, cfg)} has shape "
                f"{tuple(value.shape)}, the configuration needs {tuple(want[key].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.requires_grad_(False).eval()


def ldm_name(key: str, cfg: dict) -> str:
    """The ldm name of one diffusers key (for error messages)."""
    return next(iter(diffusers_to_ldm({key: None}, cfg)))
