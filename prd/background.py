"""The text-conditioned background learned with the student, as the reference's
("multi-prompt neural hashgrid environment map"): a colour per ray direction d and prompt,

    colour(d, text) = sigmoid_mipnerf( enc((d + 1) / 2) @ W(text) ),   W(text): (E, 3)

where enc is a multiresolution hash encoding of the direction (Mueller et al. 2022,
Instant-NGP: E = levels x features) and W a linear read-out that a small hypernetwork
makes from the prompt's pooled text embedding (CLIP's final state at the end-of-text
token). Both render branches composite over it in training, so the teachers judge the
object against a background the student chooses per prompt rather than a fixed colour.

Reference sizes (the defaults): 8 levels of 2 features, 2^19 entries per level, grid
resolutions 4 -> 256 (x1.8114 per level); hypernetwork Linear(text, 64, no bias) -
LayerNorm - SiLU - Linear(64, E * 3), Xavier-normal weights and zero biases; hash tables
uniform in [-1e-4, 1e-4] (tiny-cuda-nn's), so a fresh background is grey (0.5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import product

import torch
from torch import nn

from prd.triplane import color_activation

# Instant-NGP's spatial hash primes (the first is 1 for coherence along x)
HASH_PRIMES = (1, 2654435761, 805459861)


@dataclass
class BackgroundConfig:
    """What the renders are composited over in training."""

    learned: bool = True
    """A text-conditioned background learned with the student (the reference's); False:
    the constant ``train.background`` (which oracle teachers also render their truth over)."""
    levels: int = 8
    """Hash-encoding levels (reference: 8)."""
    features: int = 2
    """Features per level (reference: 2)."""
    log2_table_size: int = 19
    """Entries per level's table, log2 (reference: 19); coarser levels store their grid densely."""
    base_resolution: int = 4
    """Grid resolution of the coarsest level (reference: 4)."""
    max_resolution: int = 256
    """Grid resolution of the finest level (reference: 256, growth 1.8114 per level)."""
    hidden: int = 64
    """Width of the hypernetwork's hidden layer (reference: 64)."""

    def __post_init__(self):
        for name in ("levels", "features", "log2_table_size", "base_resolution", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"background.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_resolution < self.base_resolution:
            raise ValueError(
                f"background.max_resolution ({self.max_resolution}) must be >= "
                f"base_resolution ({self.base_resolution})"
            )


class HashEncoding(nn.Module):
    """Multiresolution hash encoding of points in [0, 1]^3 (Instant-NGP).

    Level l has a grid of resolution r_l = floor(base * g^l) cells per axis, g the growth
    from base to max resolution; its (r_l + 1)^3 corners index a table directly when they
    fit in 2^log2_size entries, else through the spatial hash (i p0 xor j p1 xor k p2) mod
    2^log2_size. A point's features at a level are the trilinear blend of its cell's 8
    corners; the levels' features are concatenated.
    """

    def __init__(self, levels: int, features: int, log2_size: int, base: int, finest: int):
        super().__init__()
        growth = (finest / base) ** (1.0 / (levels - 1)) if levels > 1 else 1.0
        self.resolutions = [int(base * growth**level + 1e-9) for level in range(levels)]
        self.table_size = 2**log2_size
        sizes = [min((r + 1) ** 3, self.table_size) for r in self.resolutions]
        self.tables = nn.ParameterList(
            nn.Parameter(torch.empty(n, features).uniform_(-1e-4, 1e-4)) for n in sizes
        )
        self.out_dim = levels * features

    def index(self, ijk: torch.Tensor, level: int) -> torch.Tensor:
        """Table rows of integer grid corners ijk (..., 3) at ``level``."""
        n = self.resolutions[level] + 1
        if n**3 <= self.table_size:
            return ijk[..., 0] + n * (ijk[..., 1] + n * ijk[..., 2])
        i, j, k = (ijk[..., a] * HASH_PRIMES[a] for a in range(3))
        return (i ^ j ^ k) % self.table_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., 3) in [0, 1] -> (..., levels * features), the tables' dtype."""
        out = []
        for level, (res, table) in enumerate(zip(self.resolutions, self.tables)):
            pos = x.to(table.dtype).clamp(0.0, 1.0) * res
            lo = pos.floor().clamp(max=res - 1)
            frac = pos - lo
            lo = lo.long()
            feats = 0.0
            for corner in product((0, 1), repeat=3):
                offset = torch.tensor(corner, device=x.device)
                weight = torch.where(offset.bool(), frac, 1.0 - frac).prod(dim=-1, keepdim=True)
                feats = feats + weight * table[self.index(lo + offset, level)]
            out.append(feats)
        return torch.cat(out, dim=-1)


class LearnedBackground(nn.Module):
    """The background of the module docstring; trainable, fp32 whatever the student's dtype."""

    def __init__(self, cfg: BackgroundConfig, text_dim: int):
        super().__init__()
        self.cfg = cfg
        self.encoding = HashEncoding(
            cfg.levels, cfg.features, cfg.log2_table_size, cfg.base_resolution, cfg.max_resolution
        )
        first = nn.Linear(text_dim, cfg.hidden, bias=False)
        last = nn.Linear(cfg.hidden, self.encoding.out_dim * 3)
        for layer in (first, last):
            nn.init.xavier_normal_(layer.weight)
        nn.init.zeros_(last.bias)
        self.hypernet = nn.Sequential(first, nn.LayerNorm(cfg.hidden), nn.SiLU(), last)

    def forward(self, dirs: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """dirs (B, R, 3) unit ray directions, text (B, C) pooled embeddings ->
        (B, R, 3) colours in [-0.001, 1.001], in the dirs' dtype."""
        if dirs.ndim != 3 or dirs.shape[-1] != 3 or text.shape[0] != dirs.shape[0]:
            raise ValueError(
                f"background: dirs must be (B, R, 3) and text (B, C), got {tuple(dirs.shape)} "
                f"and {tuple(text.shape)}"
            )
        dtype = self.hypernet[0].weight.dtype
        weights = self.hypernet(text.to(dtype)).view(len(text), self.encoding.out_dim, 3)
        enc = self.encoding((dirs + 1.0) / 2.0)
        return color_activation(torch.bmm(enc, weights), "sigmoid_mipnerf").to(dirs.dtype)

    def bind(self, text: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The background of B prompts (text (B, C)) as the renderers take it: per-object
        ray directions (B, R, 3) -> colours (B, R, 3)."""
        return lambda dirs: self(dirs, text)
