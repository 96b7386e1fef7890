"""The student: an SD UNet with PETA and the SD VAE decoder, text -> two triplanes.

Per object the batch holds P = 6 latents of 4 x h x w (object-major: sample n is plane
n % 6 of object n // 6), all conditioned on the object's text embedding, no CFG. Planes,
in batch order within an object:

    0 geo_xy   1 geo_xz   2 geo_yz   3 tex_xy   4 tex_xz   5 tex_yz

The plane named "ab" spans world axes (a, b) (world: right-handed, +z up). Which way
its width (last tensor dim) and rows run is ``field.plane_orientation``
(``prd.triplane.orient_planes``): the reference's "v1" makes each plane an upright picture
(xy: width +y, rows +x; xz: width -x, rows -z; yz: width +y, rows -z); with "fixed" the
width runs along +a and the rows along +b, as ``prd.triplane.PLANE_AXES`` samples them.

The VAE decoder's conv_out is replaced by a new conv of block_out_channels[0] -> 2C
channels (128 -> 64 for SD 2.1, PyTorch's default Kaiming-uniform init); geometry planes
keep channels [0:C] and texture planes [C:2C] (docs/reference.md, "Student").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from prd.arch import (
    ARCH_CONFIGS,
    ARCHS,
    TEXT_LENGTH,
    check_pretrained,
    encode_prompts,
    load_pretrained,
    sd_scheduler,
)
from prd.peta import PetaConfig, PetaModules, apply_peta, base_model, peta_parameter_groups
from prompts.tokenizer import build_clip_tokenizer
from teachers.sd import token_ids


@dataclass
class StudentConfig:
    """The student network: base SD, PETA adapters and triplane layout."""

    pretrained: str | None = None
    """Local diffusers-format SD folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/);
    None builds `arch` in code with random weights."""
    arch: str = "sd21"
    """In-code architecture: "tiny" (CPU tests) or "sd21" (stable-diffusion-2-1-base);
    with `pretrained` set, the loaded UNet must match its block and context widths."""
    allow_random_sd21: bool = False
    """Build arch sd21 with random weights when `pretrained` is None (benchmarks); without
    it an sd21 student needs `pretrained`, as the method starts from SD 2.1-base."""
    lora_rank: int = 16
    """Rank of every PETA adapter (reference: 16)."""
    lora_alpha: float = 16.0
    """LoRA alpha; adapter outputs are scaled by lora_alpha / lora_rank."""
    plane_lora: bool = True
    """A separate LoRA per plane on the UNet's self-attention q/k/v/out."""
    joint_attention: bool = True
    """Self-attention joint over the planes of one object."""
    cross_attn_lora: bool = True
    """One shared LoRA on the UNet's cross-attention q/k/v/out."""
    unet_conv_lora: bool = True
    """LoCon on the UNet's convolutions."""
    vae_conv_lora: bool = True
    """LoCon on the VAE decoder's convolutions."""
    vae_attn_lora: bool = True
    """LoRA on the VAE decoder's mid-block attention."""
    planes: int = 6
    """Latents per object: 3 geometry + 3 texture planes (only 6 is supported)."""
    triplane_channels: int = 32
    """Feature channels per plane; the new conv_out has 2x this many."""
    latent_size: int | None = None
    """Side of each plane's latent; None = the arch's default (32 sd21, 8 tiny)."""
    gradient_checkpointing: bool = False
    """Recompute UNet / decoder activations in backward to save memory (the decoder per
    up-block, for all planes at once, unless ``decode_chunk`` is set)."""
    decode_chunk: int = 0
    """Planes per checkpointed segment of the VAE decode: each chunk's whole decode is
    recomputed in backward, so the backward holds one chunk's decoder activations and the
    forward keeps only the chunk's latents and features (same outputs and gradients; one
    more decoder forward). It replaces the decoder's per-up-block checkpointing, which
    would run the decoder a third time. 0: all planes in one decoder pass."""
    denoiser_skip: bool = False
    """Random-init students only: eps = sqrt(1 - ab_t) z_t + UNet(z_t), the UNet's
    conv_out zeroed, so the fresh student is the MMSE denoiser of unit-Gaussian latents
    (x0 = sqrt(ab_t) z_t) rather than a random map whose x0 at t = 999 is noise times 15.
    A pretrained SD UNet is already a denoiser and predicts eps as is."""
    train_base: bool = False
    """Also train the UNet and VAE-decoder base weights (not only PETA). Only for students
    built in code with random weights (``pretrained`` None): such a student has no
    pretrained denoiser to preserve, and adapters on a random base cannot learn one."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"student.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.planes != 6:
            raise ValueError(
                f"student.planes must be 6 (3 geometry + 3 texture), got {self.planes}"
            )
        if self.triplane_channels < 1:
            raise ValueError(
                f"student.triplane_channels must be >= 1, got {self.triplane_channels}"
            )
        if self.decode_chunk < 0:
            raise ValueError(
                f"student.decode_chunk must be >= 0 (0: no chunks), got {self.decode_chunk}"
            )
        if self.latent_size is not None and self.latent_size < 1:
            raise ValueError(f"student.latent_size must be >= 1, got {self.latent_size}")
        if self.denoiser_skip and self.pretrained is not None:
            raise ValueError("student.denoiser_skip is for random-init students (pretrained=null)")
        if self.train_base and self.pretrained is not None:
            raise ValueError(
                "student.train_base is for random-init students; a pretrained SD student "
                "trains its PETA adapters only (set student.pretrained=null or train_base=false)"
            )
        self.peta()  # checks rank and alpha

    def resolved_latent_size(self) -> int:
        """latent_size, or the arch's default when None."""
        return self.latent_size or {"tiny": 8, "sd21": 32}[self.arch]

    def peta(self) -> PetaConfig:
        return PetaConfig(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            planes=self.planes,
            plane_lora=self.plane_lora,
            joint_attention=self.joint_attention,
            cross_attn_lora=self.cross_attn_lora,
            unet_conv_lora=self.unet_conv_lora,
            vae_conv_lora=self.vae_conv_lora,
            vae_attn_lora=self.vae_attn_lora,
        )


class _CastConv2d(nn.Conv2d):
    """Conv2d that runs in its own (fp32) dtype on inputs of a lower-precision base model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class PRDStudent(nn.Module):
    """Frozen text encoder, PETA UNet, VAE decoder with a new conv_out (see module doc)."""

    def __init__(
        self,
        cfg: StudentConfig,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: DDPMScheduler,
    ):
        super().__init__()
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                f"student needs an epsilon-prediction SD, the scheduler says "
                f"{scheduler.config.prediction_type!r} (SD 2.1-base, not the 768 v-model)"
            )
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.unet = unet
        self.scaling_factor = float(vae.config.scaling_factor)
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        old = self.decoder.conv_out
        self.decoder.conv_out = _CastConv2d(
            old.in_channels, 2 * cfg.triplane_channels, 3, padding=1, device=old.weight.device
        )
        ab = scheduler.alphas_cumprod.to(device=old.weight.device, dtype=torch.float32)
        self.register_buffer("alphas_cumprod", ab, persistent=False)
        self.peta_modules: PetaModules = apply_peta(self.unet, self.decoder, cfg.peta())
        self.post_quant_conv.requires_grad_(False)
        self.decoder.conv_out.requires_grad_(True)
        if cfg.denoiser_skip:
            # its zeroed conv_out is new, like the decoder's: trained, else no adapter
            # behind it would ever receive a gradient
            self.unet.conv_out.requires_grad_(True)
        if cfg.train_base:
            self.unet.requires_grad_(True)
            self.decoder.requires_grad_(True)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if not cfg.decode_chunk:  # chunks are their own segments (``decode``)
                vae.enable_gradient_checkpointing()  # sets the decoder's checkpoint function

    @property
    def text_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    def base_unet(self):
        """Context manager: inside it ``self.unet`` is the pretrained UNet, adapters off
        (``prd.peta.base_model``); a teacher sharing the base weights calls it there."""
        return base_model(self.unet)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> (B, 77, C_text) last hidden states of the frozen text encoder."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts)

    def eos_positions(self, prompts: list[str]) -> torch.Tensor:
        """(B,) int64: where each prompt's end-of-text token sits among the 77 tokens of
        ``encode_text`` (CLIP's pooled output is the final state there)."""
        ids = token_ids(self.tokenizer, prompts)
        return (ids == self.tokenizer.eos_token_id).int().argmax(dim=1)

    def text_encoder_id(self) -> str:
        """Names this text encoder for an embedding cache: arch, weights folder and a
        fingerprint of the token embedding (random-init encoders differ by seed)."""
        w = self.text_encoder.get_input_embeddings().weight.detach().double()
        return (
            f"{self.cfg.arch}|{self.cfg.pretrained}|{TEXT_LENGTH}|"
            f"{w.mean().item():.10e}|{w.std().item():.10e}"
        )

    def predict_x0(self, z_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Clean latents from noisy ones: x0 = (z_t - sqrt(1 - ab_t) eps) / sqrt(ab_t).

        z_t: (B*6, 4, h, w) object-major; t: (B*6,) long in [0, 999]; text: (B, 77, C)
        (each object's embedding goes to its 6 planes). Returns x0 (B*6, 4, h, w), z_t's dtype.
        """
        n, p = z_t.shape[0], self.cfg.planes
        if n % p or text.shape[0] * p != n:
            raise ValueError(f"z_t batch {n} must be 6 x text batch {text.shape[0]}")
        if t.shape != (n,):
            raise ValueError(f"t must have shape ({n},), got {tuple(t.shape)}")
        dtype = self.unet.dtype
        context = text.to(dtype).repeat_interleave(p, dim=0)
        eps = self.unet(z_t.to(dtype), t, encoder_hidden_states=context).sample.float()
        ab = self.alphas_cumprod[t].view(n, 1, 1, 1)
        if self.cfg.denoiser_skip:
            # eps of the MMSE denoiser of unit-Gaussian latents, plus the UNet's residual
            eps = eps + (1 - ab).sqrt() * z_t.float()
        x0 = (z_t.float() - (1 - ab).sqrt() * eps) / ab.sqrt()
        return x0.to(z_t.dtype)

    def decode(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 latents (B*6, 4, h, w) -> (geometry, texture), each (B, 3, C, H, W).

        Latents are divided by the VAE scaling factor first, as SD decodes. H = h * 2^(n-1)
        for n decoder blocks (256 = 32 * 8 for SD 2.1). Planes and axes: see module doc.
        With ``decode_chunk`` and gradients on, every ``decode_chunk`` planes (in batch
        order) decode as one checkpointed segment; every decoder layer works on one plane
        at a time (GroupNorm, convolutions, the mid-block's spatial attention), so chunks
        change no output.
        """
        n, p, c = x0.shape[0], self.cfg.planes, self.cfg.triplane_channels
        if n % p:
            raise ValueError(f"x0 batch {n} is not a multiple of {p} planes")
        chunk = self.cfg.decode_chunk
        if chunk and torch.is_grad_enabled():
            parts = [
                checkpoint(self._decode_planes, part, use_reentrant=False)
                for part in x0.split(chunk)
            ]
            feats = torch.cat(parts)
        else:
            feats = self._decode_planes(x0)  # (B*6, 2C, H, W)
        feats = feats.view(n // p, p, 2 * c, *feats.shape[-2:])
        return feats[:, :3, :c], feats[:, 3:, c:]

    def _decode_planes(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 latents (N, 4, h, w) -> decoder features (N, 2C, H, W)."""
        z = self.post_quant_conv(x0.to(self.post_quant_conv.weight.dtype) / self.scaling_factor)
        return self.decoder(z)


def check_base(cfg: StudentConfig) -> None:
    """Fail before any weights load: the pretrained folder is complete and fits the arch
    (FileNotFoundError / ValueError naming path and files), or, without one, the arch is
    tiny or a random sd21 was asked for (``allow_random_sd21``)."""
    if cfg.pretrained is not None:
        check_pretrained(Path(cfg.pretrained), cfg.arch)
    elif cfg.arch == "sd21" and not cfg.allow_random_sd21:
        raise ValueError(
            "student.pretrained is not set: point it at a local diffusers-format "
            "stable-diffusion-2-1-base folder, or set student.allow_random_sd21=true to "
            "build SD 2.1 with random weights"
        )


def build_student(
    cfg: StudentConfig, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> PRDStudent:
    """Build the student on `device` with base weights in `dtype` (adapters are fp32).

    device="meta" builds shapes only (parameter counting, no memory); random init then
    uses the global torch RNG. With cfg.pretrained the weights are read from that folder.
    An sd21 student with random weights needs cfg.allow_random_sd21 (``check_base``).
    """
    if torch.device(device or "cpu").type != "meta":
        check_base(cfg)
    if cfg.pretrained is not None:
        if torch.device(device or "cpu").type == "meta":
            raise ValueError("device='meta' builds the in-code arch; set pretrained=None")
        tokenizer, text, unet, vae, scheduler = load_pretrained(cfg.pretrained, cfg.arch, dtype)
        return PRDStudent(cfg, tokenizer, text, unet, vae, scheduler).to(device)
    unet_cfg, vae_cfg, text_cfg = ARCH_CONFIGS[cfg.arch]
    tokenizer = build_clip_tokenizer()
    with torch.device(device or "cpu"):
        # each part cast as soon as it is built (the same draws in the same order), so a
        # bf16 build never holds the fp32 copies of all three at once
        text = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(dtype)
        unet = UNet2DConditionModel(**unet_cfg).to(dtype)
        vae = AutoencoderKL(**vae_cfg).to(dtype)
        vae.encoder = vae.quant_conv = None  # the student only decodes
        if cfg.denoiser_skip:
            # with the skip, a zero residual makes the fresh student that MMSE denoiser
            torch.nn.init.zeros_(unet.conv_out.weight)
            torch.nn.init.zeros_(unet.conv_out.bias)
        return PRDStudent(cfg, tokenizer, text, unet, vae, sd_scheduler())


def count_parameters(model: PRDStudent) -> dict:
    """Parameter counts: UNet + VAE decoder (with post_quant_conv), text encoder apart.

    Returns {"trainable", "frozen", "ratio" (= trainable / frozen), "text_encoder",
    "groups": {PETA part or "new_conv_out": count}}.
    """
    modules = [model.unet, model.post_quant_conv, model.decoder]
    params = [p for m in modules for p in m.parameters()]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    groups = peta_parameter_groups(model.unet, model.decoder, model.peta_modules)
    counts = {k: sum(p.numel() for p in v) for k, v in groups.items()}
    counts["new_conv_out"] = sum(p.numel() for p in model.decoder.conv_out.parameters())
    return {
        "trainable": trainable,
        "frozen": frozen,
        "ratio": trainable / frozen,
        "text_encoder": sum(p.numel() for p in model.text_encoder.parameters()),
        "groups": counts,
    }


def config_dict(cfg: StudentConfig) -> dict:
    """The config as a plain dict (for checkpoints and logs)."""
    return asdict(cfg)
