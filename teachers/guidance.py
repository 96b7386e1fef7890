"""Guidance losses, timestep schedules and CFG schedules of the teachers.

Every loss is a scalar ``L`` whose gradient w.r.t. the teacher input x (n, C, h, w) is a
closed form ``dL/dx = c * g``, with g given per loss below and the normalization
``c = weight * reference_numel / (numel(x[0]) * m)``: half the squared error summed over an
image, averaged over the m = n / n_objects teacher images of each object and summed over
the objects ("sum", the reference's) or averaged over all n images (m = n, "mean"),
rescaled from the image's size to the reference teacher's input size (SD 2.1: 4x64x64
latents; MVDream: 4x32x32; RichDreamer: 4x32x32 pixels). At the reference's sizes "sum" is
the reference's loss (0.5 * sum / n_views, summed over the objects of a GPU); on a tiny
pixel-space image the total gradient reaching the student (a sum over elements) keeps the
same magnitude.

With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), and
eps_cfg = eps_uncond + s (eps_cond - eps_uncond) at the guidance scale s:

- SDS: g = w(t) (eps_cfg - noise), w(t) = 1 - alpha_bar_t ("sds") or 1 ("sds_uniform").
- x0 reconstruction (MVDream's threestudio guidance): x0 = (x_t - sigma_t eps_cfg) /
  alpha_t, then CFG rescale phi: x0 <- phi * x0 * std(x0_cond) / std(x0) + (1 - phi) * x0
  with both (unbiased) stds over all views and elements of one object; g = x - x0.
- ASD (asynchronous score distillation, TriplaneTurbo's guidance) with DMD-style
  normalization: the second prediction is the conditional eps at a later timestep
  t+ = t + floor(u * ratio * (t - t_min)) with the same noise; with mu_i = (x - sigma_t
  eps_i) / alpha_t (the reference maps both predictions with t's coefficients, from the
  clean input x), g = (mu_2 - mu_1) / (m + eps) = sigma_t / alpha_t (eps_cfg - eps_2) /
  (m + eps), m = mean |x - mu_1| over each image ("image") or each object ("object");
  "none" uses g = eps_cfg - eps_2. With ratio 0, eps_2 = eps_cond and
  eps_cfg - eps_2 = (s - 1) (eps_cond - eps_uncond): a classifier-score direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from teachers.noise import NoiseSchedule

LOSSES = ("sds", "sds_uniform", "x0", "asd")
LATENT_GRADS = ("encoder", "decoder")
ASD_NORMALIZATIONS = ("image", "object", "none")
OBJECT_REDUCTIONS = ("sum", "mean")


@dataclass
class GuidanceConfig:
    """One teacher's guidance loss and its schedules (defaults: the reference's ASD)."""

    loss: str = "asd"
    """One of "sds", "sds_uniform", "x0", "asd"."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale at step 0."""
    guidance_scale_end: float | None = None
    """CFG scale reached after ``anneal_steps`` (linear); None keeps it constant."""
    anneal_steps: int = 20000
    """Training steps over which the minimum timestep and the CFG scale anneal."""
    min_t: int = 500
    """Smallest timestep drawn at step 0 (reference: 0.5 of 1000)."""
    min_t_end: int = 20
    """Smallest timestep drawn after ``anneal_steps`` (reference: 0.02)."""
    max_t: int = 980
    """Largest timestep drawn (inclusive; reference: 0.98)."""
    per_sample_t: bool = True
    """One timestep per object (True, the reference's ASD) or one for the batch (threestudio)."""
    weight: float = 1.0
    """Multiplier of this teacher's loss."""
    recon_std_rescale: float = 0.5
    """x0 loss: CFG rescale factor phi (threestudio's MVDream: 0.5); 0 disables it."""
    asd_shift_ratio: float = 0.0
    """ASD: the later timestep's offset ratio (reference: 0, the classifier-score case)."""
    asd_shift_random: bool = True
    """ASD: draw the offset uniformly in [0, ratio * (t - t_min)] rather than its maximum."""
    asd_eps: float = 0.1
    """ASD: epsilon of the DMD-style normalization (reference: 0.1)."""
    asd_normalization: str = "image"
    """ASD: normalizer m per "image", per "object" (mean over its views), or "none"."""
    reference_numel: int | None = None
    """Elements of one image of the reference teacher's input; None = no size rescale."""
    object_reduction: str = "sum"
    """Over the objects of a batch: "sum" (the reference's) or "mean" (1/B of the sum
    against the eikonal/sparsity terms, which are means)."""
    latent_grad: str = "encoder"
    """How a latent teacher's gradient g (w.r.t. its latents z) reaches the render:
    "encoder" (the reference's: back through the VAE encoder, J_E^T g) or "decoder" (the
    latent target z - g decoded: the image's gradient is D(z) - D(z - g), scaled as the
    loss; zero where g is). Pixel-space teachers ignore it."""

    def __post_init__(self):
        choices = {
            "loss": LOSSES,
            "asd_normalization": ASD_NORMALIZATIONS,
            "object_reduction": OBJECT_REDUCTIONS,
            "latent_grad": LATENT_GRADS,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"GuidanceConfig.{name} must be one of {allowed}, got {value!r}")
        if not 0 <= self.min_t_end <= 999 or not 0 <= self.min_t <= 999:
            raise ValueError(
                f"min_t / min_t_end must lie in [0, 999], got {self.min_t}, {self.min_t_end}"
            )
        if not max(self.min_t, self.min_t_end) <= self.max_t <= 999:
            raise ValueError(
                f"max_t must lie in [max(min_t, min_t_end), 999], got {self.max_t} "
                f"(min_t {self.min_t}, min_t_end {self.min_t_end})"
            )
        if self.anneal_steps < 1:
            raise ValueError(f"anneal_steps must be >= 1, got {self.anneal_steps}")
        if self.guidance_scale < 0 or (self.guidance_scale_end or 0) < 0:
            raise ValueError(
                f"guidance scales must be >= 0, got {self.guidance_scale}, "
                f"{self.guidance_scale_end}"
            )
        if not 0.0 <= self.recon_std_rescale <= 1.0:
            raise ValueError(f"recon_std_rescale must lie in [0, 1], got {self.recon_std_rescale}")
        if self.asd_shift_ratio < 0 or self.asd_eps <= 0:
            raise ValueError(
                f"asd_shift_ratio must be >= 0 and asd_eps > 0, got {self.asd_shift_ratio}, "
                f"{self.asd_eps}"
            )
        if self.reference_numel is not None and self.reference_numel < 1:
            raise ValueError(
                f"reference_numel must be positive or None, got {self.reference_numel}"
            )


def sd_guidance() -> GuidanceConfig:
    """SD 2.1-base in the reference: ASD, CFG 7.5, 4x64x64 latents."""
    return GuidanceConfig(loss="asd", guidance_scale=7.5, reference_numel=4 * 64 * 64)


def mvdream_guidance() -> GuidanceConfig:
    """MVDream in the reference: ASD, CFG 20 -> 10 over 20k steps (docs/reference.md),
    4x32x32 latents."""
    return GuidanceConfig(
        loss="asd", guidance_scale=20.0, guidance_scale_end=10.0, reference_numel=4 * 32 * 32
    )


def richdreamer_guidance() -> GuidanceConfig:
    """RichDreamer ND-MV in the reference: ASD with shift ratio 0.1 (TriplaneTurbo v1's
    rd_plus_ratio), CFG 20, 4x32x32 pixels."""
    return GuidanceConfig(
        loss="asd", guidance_scale=20.0, asd_shift_ratio=0.1, reference_numel=4 * 32 * 32
    )


def _progress(cfg: GuidanceConfig, step: int) -> float:
    if step < 0:
        raise ValueError(f"training step must be >= 0, got {step}")
    return min(step / cfg.anneal_steps, 1.0)


def guidance_scale_at(cfg: GuidanceConfig, step: int) -> float:
    """CFG scale at a training step: constant, or linear to guidance_scale_end."""
    if cfg.guidance_scale_end is None:
        return cfg.guidance_scale
    f = _progress(cfg, step)
    return cfg.guidance_scale + (cfg.guidance_scale_end - cfg.guidance_scale) * f


def timestep_range(cfg: GuidanceConfig, step: int) -> tuple[int, int]:
    """Inclusive (lo, hi) timesteps at a step; lo anneals linearly min_t -> min_t_end."""
    lo = round(cfg.min_t + (cfg.min_t_end - cfg.min_t) * _progress(cfg, step))
    return lo, cfg.max_t


def sample_timesteps(
    cfg: GuidanceConfig, step: int, n_groups: int, generator: torch.Generator
) -> Tensor:
    """(n_groups,) int64 timesteps, uniform in ``timestep_range``; one value shared by all
    groups unless ``per_sample_t``. Drawn on the generator's device."""
    lo, hi = timestep_range(cfg, step)
    n = n_groups if cfg.per_sample_t else 1
    t = torch.randint(lo, hi + 1, (n,), generator=generator, device=generator.device)
    return t.expand(n_groups).clone()


def shifted_timesteps(
    t: Tensor,
    t_min: int,
    ratio: float,
    random: bool,
    generator: torch.Generator,
    n_steps: int = 1000,
) -> Tensor:
    """ASD's later timesteps t+ = t + floor(u * ratio * (t - t_min)), u ~ U[0, 1) (or u = 1
    without ``random``); the offset is capped at n_steps - 1 - t and t+ kept in [1, n_steps - 1].
    """
    cap = (ratio * (t - t_min).double()).clamp(min=0)
    cap = torch.minimum(cap, (n_steps - 1 - t).double().clamp(min=0))
    if random:
        u = torch.rand(t.shape, generator=generator, device=generator.device, dtype=torch.float64)
        cap = cap * u.to(cap.device)
    return (t + cap.floor().long()).clamp(1, n_steps - 1)


def cfg_eps(eps_cond: Tensor, eps_uncond: Tensor, guidance_scale: float) -> Tensor:
    """eps_uncond + s (eps_cond - eps_uncond)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def loss_scale(x: Tensor, cfg: GuidanceConfig, n_objects: int) -> float:
    """c = weight * reference_numel / (numel of one image * m) for the n = len(x) images of
    ``n_objects`` objects; m = n / n_objects ("sum") or n ("mean") (module docstring)."""
    n = x.shape[0]
    if n_objects < 1 or n % n_objects:
        raise ValueError(f"{n} teacher images do not split into {n_objects} objects")
    per_image = x[0].numel()
    ref = cfg.reference_numel if cfg.reference_numel is not None else per_image
    images = n // n_objects if cfg.object_reduction == "sum" else n
    return cfg.weight * ref / (per_image * images)


def surrogate(x: Tensor, grad: Tensor, scale: float) -> Tensor:
    """0.5 * scale * ||x - sg(x - grad)||^2, whose gradient w.r.t. x is scale * grad."""
    target = (x - grad).detach()
    return 0.5 * scale * (x - target).square().sum()


def sds_loss(
    x: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor,
    noise: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    guidance_scale: float,
    uniform: bool,
    scale: float,
) -> Tensor:
    """SDS: dL/dx = scale * w(t) (eps_cfg - noise); w = 1 if ``uniform`` else 1 - alpha_bar_t."""
    with torch.no_grad():
        w = 1.0 if uniform else 1 - schedule.alpha_bar(t, x)
        g = torch.nan_to_num(w * (cfg_eps(eps_cond, eps_uncond, guidance_scale) - noise))
    return surrogate(x, g, scale)


def x0_target(
    x_t: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    guidance_scale: float,
    group: int,
    rescale: float,
) -> Tensor:
    """The CFG x0 estimate with threestudio's CFG rescale over each object's ``group`` views."""
    x0 = schedule.x0_from_eps(x_t, cfg_eps(eps_cond, eps_uncond, guidance_scale), t)
    if rescale > 0:
        x0_cond = schedule.x0_from_eps(x_t, eps_cond, t)
        per_object = lambda v: v.reshape(-1, group * v[0].numel()).std(dim=1)
        factor = (per_object(x0_cond) + 1e-8) / (per_object(x0) + 1e-8)
        factor = factor.repeat_interleave(group).view(-1, *([1] * (x0.dim() - 1)))
        x0 = rescale * x0 * factor + (1 - rescale) * x0
    return x0


def x0_loss(
    x: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor,
    noise: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    guidance_scale: float,
    group: int,
    rescale: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """x0 reconstruction: dL/dx = scale * (x - x0), x0 from ``x0_target`` at
    x_t = alpha_t sg(x) + sigma_t noise. Returns (loss, x0)."""
    with torch.no_grad():
        x_t = schedule.add_noise(x.detach(), noise, t)
        x0 = x0_target(x_t, eps_cond, eps_uncond, t, schedule, guidance_scale, group, rescale)
    return surrogate(x, torch.nan_to_num(x - x0), scale), x0


def asd_loss(
    x: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor,
    eps_second: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    guidance_scale: float,
    normalization: str,
    eps: float,
    group: int,
    scale: float,
) -> Tensor:
    """ASD: dL/dx = scale * g with g of the module docstring; ``eps_second`` is the
    conditional prediction at the later timestep t+ (the same noise)."""
    with torch.no_grad():
        e1 = cfg_eps(eps_cond, eps_uncond, guidance_scale)
        if normalization == "none":
            g = e1 - eps_second
        else:
            a, s = schedule.coefficients(t, x)
            mu1 = (x - s * e1) / a
            m = (x - mu1).abs().flatten(1).mean(dim=1)
            if normalization == "object":
                m = m.view(-1, group).mean(dim=1).repeat_interleave(group)
            elif normalization != "image":
                raise ValueError(f"unknown ASD normalization {normalization!r}")
            g = (s / a) * (e1 - eps_second) / (m.view(-1, *([1] * (x.dim() - 1))) + eps)
        g = torch.nan_to_num(g)
    return surrogate(x, g, scale)
