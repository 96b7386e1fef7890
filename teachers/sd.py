"""Stable Diffusion (2.1-base in the paper) as a frozen teacher, from a local diffusers folder.

    denoiser = load_pretrained("/models/stable-diffusion-2-1-base", dtype=torch.float16)
    cond = denoiser.encode_text(["a red cube", ""])   # (2, 77, 1024); "" is unconditional
    eps = denoiser(x_t, t, cond, None)                 # (2, 4, 64, 64), x_t's dtype

The eps is the UNet's output on the text encoder's last hidden states (for SD 2.x that
already is OpenCLIP's penultimate layer with the final norm). The noise schedule and the
prediction type come from the folder's ``scheduler/scheduler_config.json``; a
v-prediction model (SD 2.1 768) is converted to eps = sigma_t x_t + alpha_t v, so every
teacher loss sees an eps model.

Images reach the model as latents: renders in [-1, 1] at the teacher's resolution (512 px
for SD 2.1), VAE-encoded with gradients (``vae_encode``: a posterior sample drawn from the
caller's generator, times the VAE's ``scaling_factor``, as the reference's SD guidance).
MVDream's checkpoint carries the same SD VAE and reuses ``vae_encode``.

When the teacher's folder is the student's base folder, the student's UNet and text
encoder serve as the teacher's (``SDDenoiser`` with ``borrowed``): the student owns them,
the teacher runs the UNet inside the student's context that disables its adapters, and no
second copy of the weights is loaded (the reference loads two).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextModel, CLIPTokenizer

from renderers.cameras import Cameras
from teachers.base import TextMemo
from teachers.files import load_part
from teachers.noise import NoiseSchedule

TEXT_LENGTH = 77
# Files of a diffusers-format SD folder; "a | b": either one (the hub's folders carry
# vocab.json + merges.txt, transformers 5 saves tokenizer.json).
SD_FOLDER_FILES = (
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
PREDICTION_TYPES = ("epsilon", "v_prediction")
TEXT_MEMO = 256
"""Prompts whose conditioning a teacher keeps in memory (``teachers.base.TextMemo``)."""


def check_sd_folder(folder: str | Path, key: str, hint: str = "") -> Path:
    """``folder`` as a Path if it is a complete diffusers-format SD folder, else
    FileNotFoundError naming the config ``key``, the path, the files it lacks and the files
    expected (``hint`` is appended when the folder itself is absent)."""
    folder = Path(folder)
    expected = f"a diffusers-format Stable Diffusion folder has: {list(SD_FOLDER_FILES)}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}: no folder {folder}{hint}; {expected}")
    missing = [
        f for f in SD_FOLDER_FILES if not any((folder / a).is_file() for a in f.split(" | "))
    ]
    if missing:
        raise FileNotFoundError(f"{key}: SD folder {folder} is missing {missing}; {expected}")
    return folder


def token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> Tensor:
    """(B, 77) int64 token ids, padded and truncated to 77 tokens as SD, MVDream and
    ND-MV condition on them."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=TEXT_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]
) -> Tensor:
    """prompts -> (B, 77, C_text) last hidden states of ``token_ids``; on the text
    encoder's device, in its dtype."""
    ids = token_ids(tokenizer, prompts)
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state


def vae_encode(
    vae: AutoencoderKL,
    image: Tensor,
    generator: torch.Generator,
    gradient_checkpointing: bool = False,
) -> Tensor:
    """Latents of images, differentiable w.r.t. them.

    image: (n, 3, H, W) in [-1, 1], H and W multiples of the VAE's downsampling factor.
    Returns (n, C_latent, H / f, W / f) = (mean + std * noise) * scaling_factor in image's
    dtype; the encoder runs in the VAE's dtype; noise ~ N(0, I) is drawn from
    ``generator`` on its device. gradient_checkpointing recomputes the encoder's
    activations in backward (at 512 px the largest activation of the SD teacher).
    """

    def moments(x: Tensor) -> Tensor:
        h = vae.encoder(x)
        return vae.quant_conv(h) if vae.quant_conv is not None else h

    x = image.to(vae.dtype)
    if gradient_checkpointing and torch.is_grad_enabled():
        params = checkpoint(moments, x, use_reentrant=False)
    else:
        params = moments(x)
    # the sample in at least fp32 (an fp16 VAE's moments are upcast)
    mean, logvar = params.to(torch.promote_types(params.dtype, torch.float32)).chunk(2, dim=1)
    std = (0.5 * logvar.clamp(-30.0, 20.0)).exp()  # diffusers' DiagonalGaussianDistribution
    noise = torch.randn(mean.shape, generator=generator, device=generator.device)
    noise = noise.to(device=mean.device, dtype=mean.dtype)
    latents = (mean + std * noise) * float(vae.config.scaling_factor)
    return latents.to(image.dtype)


@torch.no_grad()
def vae_decode(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """Latents (n, C, h, w) scaled as ``vae_encode``'s -> images (n, 3, h f, w f) in
    [-1, 1] (clamped), in the latents' dtype."""
    z = latents.to(vae.dtype) / float(vae.config.scaling_factor)
    return vae.decode(z).sample.clamp(-1, 1).to(latents.dtype)


def schedule_from(scheduler: DDPMScheduler, where: str) -> NoiseSchedule:
    """The teacher's noise schedule from a diffusers scheduler (its alphas_cumprod); the
    guidance schedules assume 1000 training timesteps."""
    c = scheduler.config
    if c.num_train_timesteps != 1000:
        raise ValueError(
            f"{where}: num_train_timesteps={c.num_train_timesteps}; the teachers need 1000"
        )
    plain = c.trained_betas is None and not c.get("rescale_betas_zero_snr", False)
    if c.beta_schedule == "scaled_linear" and plain:
        return NoiseSchedule(c.beta_start, c.beta_end, 1000)  # in float64, as the oracle's
    return NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)


class SDDenoiser(nn.Module):
    """A frozen SD eps model (the ``teachers.base.Denoiser`` protocol) with its VAE.

    tokenizer, text_encoder, unet, vae, scheduler: a diffusers SD's parts (owned: registered
    here and frozen). borrowed: a context factory under which ``unet`` runs as the
    pretrained model; the UNet and text encoder then belong to another module (the
    student's base), are not registered (the teacher's freezing, device moves and state
    dict leave them alone) and compute in that module's dtype. text_fn: prompts ->
    (B, 77, C) conditioning, replacing the tokenizer + text encoder call (e.g. through an
    embedding cache). gradient_checkpointing: of the VAE encoder in ``encode_images``.
    """

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: DDPMScheduler,
        borrowed: Callable[[], contextlib.AbstractContextManager] | None = None,
        text_fn: Callable[[list[str]], Tensor] | None = None,
        gradient_checkpointing: bool = False,
        where: str = "SD teacher",
    ):
        super().__init__()
        prediction = scheduler.config.prediction_type
        if prediction not in PREDICTION_TYPES:
            raise ValueError(
                f"{where}: scheduler prediction_type {prediction!r} is not one of "
                f"{PREDICTION_TYPES}"
            )
        self.prediction_type = prediction
        self.schedule = schedule_from(scheduler, where)
        self.tokenizer = tokenizer
        self.vae = vae.requires_grad_(False).eval()
        self.borrowed = borrowed
        if borrowed is None:
            self.unet = unet.requires_grad_(False).eval()
            self.text_encoder = text_encoder.requires_grad_(False).eval()
        else:
            # a tuple is not registered by nn.Module: the owner keeps them
            self._borrowed_models = (unet, text_encoder)
        self.text_fn = text_fn
        self.gradient_checkpointing = gradient_checkpointing
        self._memo = TextMemo(self._encode_new, TEXT_MEMO)

    def models(self) -> tuple[UNet2DConditionModel, CLIPTextModel]:
        """(UNet, text encoder), owned or borrowed."""
        if self.borrowed is None:
            return self.unet, self.text_encoder
        return self._borrowed_models

    def encode_text(self, prompts: list[str]) -> Tensor:
        """(B, 77, C) conditioning, each prompt computed once while it stays among the
        TEXT_MEMO most recently used; "" is the unconditional prompt."""
        return self._memo(prompts)

    def _encode_new(self, prompts: list[str]) -> Tensor:
        if self.text_fn is not None:
            return self.text_fn(prompts)
        return encode_prompts(self.tokenizer, self.models()[1], prompts)

    @torch.no_grad()
    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor, cameras: Cameras | None) -> Tensor:
        """eps (B, C, h, w) in x_t's dtype for latents x_t (B, C, h, w) at integer
        timesteps t (B,) and conditioning (B, 77, C_text); cameras are not used."""
        unet = self.models()[0]
        dtype = unet.dtype
        context = self.borrowed() if self.borrowed is not None else contextlib.nullcontext()
        with context:
            out = unet(x_t.to(dtype), t, encoder_hidden_states=cond.to(x_t.device, dtype)).sample
        out = out.float()
        if self.prediction_type == "v_prediction":
            a, s = self.schedule.coefficients(t, out)
            out = s * x_t.float() + a * out  # v = alpha eps - sigma x0
        return out.to(x_t.dtype)

    def encode_images(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """Renders (n, 3, H, W) in [-1, 1] -> latents (``vae_encode``), with gradients."""
        return encode_checked(self.vae, image, generator, self.gradient_checkpointing, "SD")

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] (``vae_decode``), no gradients."""
        return vae_decode(self.vae, latents)


def downsampling(vae: AutoencoderKL) -> int:
    """Image pixels per latent pixel (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_checked(
    vae: AutoencoderKL,
    image: Tensor,
    generator: torch.Generator,
    gradient_checkpointing: bool,
    teacher: str,
) -> Tensor:
    """``vae_encode`` after checking the image size against the VAE's downsampling factor
    (ValueError naming the ``teacher`` whose resolution to change)."""
    f = downsampling(vae)
    if image.shape[-1] % f or image.shape[-2] % f:
        raise ValueError(
            f"{teacher} teacher: image size {tuple(image.shape[-2:])} is not a multiple of the "
            f"VAE's downsampling factor {f}; set the teacher's resolution to one"
        )
    return vae_encode(vae, image, generator, gradient_checkpointing)


class LatentCodec(nn.Module):
    """A frozen SD VAE as a latent teacher's image <-> latent maps (MVDream's checkpoint
    carries SD's VAE): ``encode_images`` with gradients, ``decode_latents`` without."""

    def __init__(self, vae: AutoencoderKL, gradient_checkpointing: bool, teacher: str):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.gradient_checkpointing = gradient_checkpointing
        self.teacher = teacher

    def encode_images(self, image: Tensor, generator: torch.Generator) -> Tensor:
        return encode_checked(self.vae, image, generator, self.gradient_checkpointing, self.teacher)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return vae_decode(self.vae, latents)


def load_parts(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    key: str = "pretrained",
    unet: bool = True,
):
    """(tokenizer, text encoder, UNet, VAE, scheduler) of a diffusers-format SD folder in
    ``dtype``, after ``check_sd_folder``; with ``unet`` False the text encoder and UNet
    are not read (None), for a teacher that borrows them."""
    folder = check_sd_folder(folder, key)
    text = model = None
    if unet:
        model = load_part(
            folder / "unet",
            lambda: UNet2DConditionModel.from_pretrained(
                folder, subfolder="unet", torch_dtype=dtype
            ),
        )
        text = load_part(
            folder / "text_encoder",
            lambda: CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype),
        )
    vae = load_part(
        folder / "vae",
        lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
    )
    tokenizer = load_part(
        folder / "tokenizer", lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer")
    )
    scheduler = load_part(
        folder / "scheduler",
        lambda: DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )
    return tokenizer, text, model, vae, scheduler


def load_pretrained(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
) -> SDDenoiser:
    """The frozen SD teacher of a local diffusers-format folder, weights in ``dtype``, on
    the CPU (move it with ``.to(device)``)."""
    tokenizer, text, unet, vae, scheduler = load_parts(folder, dtype, "SD teacher")
    return SDDenoiser(
        tokenizer,
        text,
        unet,
        vae,
        scheduler,
        gradient_checkpointing=gradient_checkpointing,
        where=str(folder),
    )
