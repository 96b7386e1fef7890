"""The DDPM noise schedule of Stable Diffusion (and MVDream, RichDreamer).

``scaled_linear`` betas from 0.00085 to 0.012 over 1000 steps (SD's scheduler_config):
beta_i = (sqrt(0.00085) + i / 999 * (sqrt(0.012) - sqrt(0.00085)))^2, and
alpha_bar_t = prod_{i <= t} (1 - beta_i). Forward process:
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
"""

from __future__ import annotations

import torch
from torch import Tensor


class NoiseSchedule:
    """alpha_bar over ``n_steps`` integer timesteps, kept in float64 and cast on use."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, n_steps: int = 1000):
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"betas must satisfy 0 < start < end < 1, got {beta_start, beta_end}")
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n_steps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.n_steps = n_steps

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> NoiseSchedule:
        """The schedule of given alpha_bar values (n_steps,), e.g. a diffusers scheduler's."""
        ab = torch.as_tensor(alphas_cumprod).detach().to(torch.float64).cpu()
        if ab.dim() != 1 or not bool(((ab > 0) & (ab <= 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-d tensor of values in (0, 1]")
        schedule = cls(n_steps=len(ab))
        schedule.alphas_cumprod = ab.clone()
        return schedule

    def alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha_bar_t for integer t (B,), shaped (B, 1, 1, 1) in the dtype/device of ``like``."""
        if bool(((t < 0) | (t >= self.n_steps)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.n_steps}), got {t.tolist()}")
        ab = self.alphas_cumprod[t.long().cpu()].to(device=like.device, dtype=like.dtype)
        return ab.view(-1, *([1] * (like.dim() - 1)))

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), broadcastable."""
        ab = self.alpha_bar(t, like)
        return ab.sqrt(), (1 - ab).sqrt()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha_t x0 + sigma_t noise."""
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x0 = (x_t - sigma_t eps) / alpha_t."""
        a, s = self.coefficients(t, x_t)
        return (x_t - s * eps) / a

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """eps = (x_t - alpha_t x0) / sigma_t."""
        a, s = self.coefficients(t, x_t)
        return (x_t - a * x0) / s
