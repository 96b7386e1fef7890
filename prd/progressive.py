"""The progressive denoising schedule shared by training and sampling.

The student denoises in K steps at timesteps t_1 > ... > t_K (reference: K = 4 at
999, 749, 499, 249). Step 1 starts from pure noise; step k > 1 starts from the previous
step's clean latent x0, brought back to t_k:
- in training with *fresh* noise (DDPM forward process, the paper's Algorithm),
- at sampling with DDIM (eta = 0): the previous step's own eps estimate is reused.
Renders are never re-encoded: everything stays in latent space.
"""

from __future__ import annotations

import torch


def progressive_timesteps(k: int, num_train_timesteps: int = 1000) -> list[int]:
    """K evenly spaced timesteps from the top, e.g. K=4 -> [999, 749, 499, 249]."""
    if not 1 <= k <= num_train_timesteps:
        raise ValueError(f"progressive steps must lie in [1, {num_train_timesteps}], got {k}")
    stride = num_train_timesteps // k
    return [num_train_timesteps - 1 - i * stride for i in range(k)]


def sd_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """alpha_bar_t of Stable Diffusion's "scaled_linear" DDPM schedule, float64 (T,)."""
    betas = (
        torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)
        ** 2
    )
    return torch.cumprod(1.0 - betas, dim=0)


def _ab(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    ab = alphas_cumprod.to(like.device)[t.to(like.device)].to(like.dtype)
    return ab.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0, noise, t, alphas_cumprod):
    """DDPM forward: sqrt(ab_t) x0 + sqrt(1 - ab_t) noise; t is (N,) long."""
    ab = _ab(alphas_cumprod, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def x0_from_eps(z_t, eps, t, alphas_cumprod):
    """Invert the forward process for x0 given the predicted eps."""
    ab = _ab(alphas_cumprod, t, z_t)
    return (z_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def eps_from_x0(z_t, x0, t, alphas_cumprod):
    """The eps consistent with z_t and x0 (used by DDIM's deterministic update)."""
    ab = _ab(alphas_cumprod, t, z_t)
    return (z_t - ab.sqrt() * x0) / (1 - ab).sqrt()
