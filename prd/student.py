"""The student: an SD UNet with PETA and the SD VAE decoder, text -> two triplanes.

Per object the batch holds P = 6 latents of 4 x h x w (object-major: sample n is plane
n % 6 of object n // 6), all conditioned on the object's text embedding, no CFG. Planes,
in batch order within an object:

    0 geo_xy   1 geo_xz   2 geo_yz   3 tex_xy   4 tex_xz   5 tex_yz

The plane named "ab" spans world axes (a, b) (world: right-handed, +z up): its width
(last tensor dim, left to right) runs along a and its height (rows, top to bottom) along b,
i.e. ``grid_sample`` coordinates (p_a, p_b) / bound with align_corners=True, as
``prd.triplane.PLANE_AXES`` = ((0, 1), (0, 2), (1, 2)) samples them.

The VAE decoder's conv_out is replaced by a new conv of block_out_channels[0] -> 2C
channels (128 -> 64 for SD 2.1, PyTorch's default Kaiming-uniform init); geometry planes
keep channels [0:C] and texture planes [C:2C] (DESIGN, "Student").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from prd.peta import PetaConfig, PetaModules, apply_peta, peta_parameter_groups
from prompts.tokenizer import build_clip_tokenizer

ARCHS = ("tiny", "sd21")
TEXT_LENGTH = 77
CHECKPOINT_FORMAT = "prd-trainable-v1"
# Files of a diffusers-format SD folder that the student reads; "a | b": either one (the
# hub's folders carry vocab.json + merges.txt, transformers 5 saves tokenizer.json).
PRETRAINED_FILES = (
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json | tokenizer/tokenizer.json",
    "tokenizer/merges.txt | tokenizer/tokenizer.json",
    "scheduler/scheduler_config.json",
)


@dataclass
class StudentConfig:
    """The student network: base SD, PETA adapters and triplane layout."""

    pretrained: str | None = None
    """Local diffusers-format SD folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/);
    None builds `arch` in code with random weights."""
    arch: str = "sd21"
    """In-code architecture: "tiny" (CPU tests) or "sd21" (stable-diffusion-2-1-base);
    with `pretrained` set, the loaded UNet must match its block and context widths."""
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
    """Recompute UNet / decoder activations in backward to save memory."""
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


# stabilityai/stable-diffusion-2-1-base unet/config.json (architecture keys).
SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),  # number of heads (head dim 64), diffusers' naming
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
)
# Same block structure at CPU size; 2 and 4 heads of dim 16.
TINY_UNET = dict(
    SD21_UNET,
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
)
# stabilityai/stable-diffusion-2-1-base vae/config.json.
SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)
# Three decoder blocks: planes upsample x4 (8 -> 32), enough texels for the oracle scenes.
TINY_VAE = dict(
    SD21_VAE,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
)
# stable-diffusion-2-1-base text_encoder/config.json: OpenCLIP ViT-H text tower, last layer dropped.
SD21_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=TEXT_LENGTH,
    hidden_act="gelu",
    projection_dim=512,
    eos_token_id=49407,
)
TINY_TEXT = dict(SD21_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, projection_dim=32)  # fmt: skip
ARCH_CONFIGS = {
    "sd21": (SD21_UNET, SD21_VAE, SD21_TEXT),
    "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT),
}


def sd_scheduler() -> DDPMScheduler:
    """SD's DDPM training schedule: scaled_linear betas 0.00085..0.012, 1000 steps, eps."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]
) -> torch.Tensor:
    """prompts -> (B, 77, C_text) last hidden states, padded and truncated to 77 tokens as
    SD conditions on them; on the text encoder's device."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=TEXT_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state


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
            vae.enable_gradient_checkpointing()  # sets the decoder's checkpoint function

    @property
    def text_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> (B, 77, C_text) last hidden states of the frozen text encoder."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts)

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
        """
        n, p, c = x0.shape[0], self.cfg.planes, self.cfg.triplane_channels
        if n % p:
            raise ValueError(f"x0 batch {n} is not a multiple of {p} planes")
        z = self.post_quant_conv(x0.to(self.post_quant_conv.weight.dtype) / self.scaling_factor)
        feats = self.decoder(z)  # (B*6, 2C, H, W)
        feats = feats.view(n // p, p, 2 * c, *feats.shape[-2:])
        return feats[:, :3, :c], feats[:, 3:, c:]


def _check_pretrained(folder: Path, arch: str) -> None:
    if not folder.is_dir():
        hint = f"; `prd tiny-base --out {folder}` builds one" if arch == "tiny" else ""
        raise FileNotFoundError(
            f"student.pretrained: no folder {folder}{hint}; a diffusers-format "
            f"stable-diffusion-2-1-base folder has: {list(PRETRAINED_FILES)}"
        )
    missing = [
        f for f in PRETRAINED_FILES if not any((folder / a).is_file() for a in f.split(" | "))
    ]
    if missing:
        raise FileNotFoundError(
            f"pretrained SD folder {folder} is missing {missing}; a diffusers-format "
            f"stable-diffusion-2-1-base folder has: {list(PRETRAINED_FILES)}"
        )


def _load_pretrained(cfg: StudentConfig, dtype: torch.dtype):
    folder = Path(cfg.pretrained)
    _check_pretrained(folder, cfg.arch)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    want = ARCH_CONFIGS[cfg.arch][0]
    for key in ("block_out_channels", "cross_attention_dim"):
        got, exp = unet.config[key], want[key]
        if (list(got) if isinstance(got, (list, tuple)) else got) != (
            list(exp) if isinstance(exp, (list, tuple)) else exp
        ):
            raise ValueError(f"{folder}/unet/config.json: {key}={got}, arch {cfg.arch} has {exp}")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    text = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return tokenizer, text, unet, vae, scheduler


def build_student(
    cfg: StudentConfig, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> PRDStudent:
    """Build the student on `device` with base weights in `dtype` (adapters are fp32).

    device="meta" builds shapes only (parameter counting, no memory); random init then
    uses the global torch RNG. With cfg.pretrained the weights are read from that folder.
    """
    if cfg.pretrained is not None:
        if torch.device(device or "cpu").type == "meta":
            raise ValueError("device='meta' builds the in-code arch; set pretrained=None")
        tokenizer, text, unet, vae, scheduler = _load_pretrained(cfg, dtype)
        return PRDStudent(cfg, tokenizer, text, unet, vae, scheduler).to(device)
    unet_cfg, vae_cfg, text_cfg = ARCH_CONFIGS[cfg.arch]
    tokenizer = build_clip_tokenizer()
    with torch.device(device or "cpu"):
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        if dtype != torch.float32:
            text, unet, vae = text.to(dtype), unet.to(dtype), vae.to(dtype)
        vae.encoder = vae.quant_conv = None  # the student only decodes
        if cfg.denoiser_skip:
            # with the skip, a zero residual makes the fresh student that MMSE denoiser
            torch.nn.init.zeros_(unet.conv_out.weight)
            torch.nn.init.zeros_(unet.conv_out.bias)
        return PRDStudent(cfg, tokenizer, text, unet, vae, sd_scheduler())


def _base_modules(model: PRDStudent) -> dict[str, nn.Module]:
    return {"unet": model.unet, "decoder": model.decoder}


def trainable_state_dict(model: PRDStudent) -> dict[str, torch.Tensor]:
    """The tensors that require grad, keyed by their name in the student."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _metadata(model: PRDStudent) -> dict[str, str]:
    cfg = model.cfg
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": cfg.arch,
        "lora_rank": str(cfg.lora_rank),
        "planes": str(cfg.planes),
        "triplane_channels": str(cfg.triplane_channels),
        "base_fingerprint": json.dumps(base_fingerprint(model)),
    }


def base_fingerprint(model: PRDStudent) -> list[float]:
    """Mean and std of the first and last frozen tensor of the UNet and of the decoder.

    Cheap evidence that adapters are loaded onto the base weights they were trained on;
    compared with a relative tolerance so fp16 / bf16 copies of one base still match.
    A module trained whole (``train_base``) has no frozen tensor and contributes nothing:
    its weights are all in the exported file.
    """
    stats = []
    for module in _base_modules(model).values():
        frozen = [p for p in module.parameters() if not p.requires_grad]
        for p in frozen[:1] + frozen[-1:]:
            x = p.detach().double()
            stats += [x.mean().item(), x.std().item()]
    return stats


def save_trainable(model: PRDStudent, path: str | Path) -> None:
    """Write the trainable tensors (fp32) to a safetensors file with a metadata header."""
    tensors = {
        n: p.detach().float().cpu().contiguous() for n, p in trainable_state_dict(model).items()
    }
    save_file(tensors, str(path), metadata=_metadata(model))


def load_trainable(model: PRDStudent, path: str | Path) -> None:
    """Load trainable tensors saved by save_trainable into `model`, in place.

    Fails, naming the keys or fields, on a metadata mismatch (format, arch, rank, planes,
    channels, base-weight fingerprint), a missing or unexpected key, or a shape mismatch.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    check_metadata(meta, _metadata(model), path)
    copy_checked(trainable_state_dict(model), tensors, path)


def check_metadata(meta: dict, want: dict, path, prefix: str = "") -> None:
    """Compare a weights file's header with a model's ``_metadata`` (keys of the header
    carry ``prefix``); the base fingerprint with a relative tolerance. Raises ValueError
    naming the field."""
    for key in ("format", "arch", "lora_rank", "planes", "triplane_channels"):
        if meta.get(prefix + key) != want[key]:
            got = meta.get(prefix + key)
            raise ValueError(f"{path}: metadata {prefix}{key}={got!r}, model has {want[key]!r}")
    got_fp = json.loads(meta.get(prefix + "base_fingerprint", "[]"))
    want_fp = json.loads(want["base_fingerprint"])
    if len(got_fp) != len(want_fp) or not torch.allclose(
        torch.tensor(got_fp), torch.tensor(want_fp), rtol=1e-2, atol=1e-6
    ):
        raise ValueError(
            f"{path}: adapters were trained on other base weights "
            f"(fingerprint {got_fp} vs model {want_fp})"
        )


def copy_checked(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path) -> None:
    """Copy ``tensors`` into ``params`` in place after checking that the key sets and the
    shapes agree (KeyError / ValueError naming the keys)."""
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise KeyError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    bad = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(p.shape)}" for k, p in params.items()
           if tensors[k].shape != p.shape]  # fmt: skip
    if bad:
        raise ValueError(f"{path}: shape mismatch (file vs model) {bad}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])


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
