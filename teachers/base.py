"""What every teacher exchanges with the training loop: renders in, a guidance loss out.

A teacher is three parts wired in its constructor (``teachers.distill``): a *role* that
packs the student's renders into the model's input (``teachers.roles``), a frozen
*denoiser* (a real diffusion model, or the analytic oracle of ``teachers.oracle``), and a
guidance loss with its timestep and CFG schedules (``teachers.guidance``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from renderers.cameras import Cameras


@dataclass
class Views:
    """What the student's renderers hand to a teacher: N views, views of one object contiguous."""

    rgb: Tensor
    """(N, H, W, 3) in [0, 1], composited over the background."""
    mask: Tensor
    """(N, H, W) in [0, 1]."""
    depth: Tensor
    """(N, H, W) camera-space z-depth, world units (distance along the view axis); any value
    where mask = 0."""
    normal: Tensor
    """(N, H, W, 3) camera-space unit normals (x right, y up, z backward); any value where
    mask = 0."""
    cameras: Cameras
    """The N cameras."""
    views_per_object: int
    """Views of one object, contiguous in the batch; N is a multiple of it."""

    def __post_init__(self):
        n = self.rgb.shape[0]
        if self.views_per_object < 1 or n % self.views_per_object:
            raise ValueError(
                f"Views: {n} views is not a multiple of views_per_object={self.views_per_object}"
            )
        shapes = {
            "mask": (self.mask.shape, (n, *self.rgb.shape[1:3])),
            "depth": (self.depth.shape, (n, *self.rgb.shape[1:3])),
            "normal": (self.normal.shape, self.rgb.shape),
        }
        for name, (got, want) in shapes.items():
            if tuple(got) != tuple(want):
                raise ValueError(f"Views.{name} has shape {tuple(got)}, expected {tuple(want)}")
        if len(self.cameras) != n or self.rgb.shape[-1] != 3:
            raise ValueError(
                f"Views: rgb {tuple(self.rgb.shape)} needs (N, H, W, 3) and N = "
                f"{len(self.cameras)} cameras"
            )

    @property
    def n_objects(self) -> int:
        return self.rgb.shape[0] // self.views_per_object


@dataclass
class GuidanceOut:
    """A teacher's answer for one batch of views."""

    loss: Tensor
    """Scalar, differentiable w.r.t. the Views tensors."""
    x0: Tensor
    """(n, C, h, w) the teacher's x0 estimate in its model space (latents or pixels), detached."""
    timesteps: Tensor
    """(b,) the timesteps drawn (one per teacher sample: per object for multi-view roles)."""
    to_image: Callable[[Tensor], Tensor]
    """Model space -> (n, h, w, C) image space in [0, 1] (a latent teacher's VAE decode)."""

    @property
    def target(self) -> Tensor:
        """(n, h, w, C) the x0 estimate in image space ([0, 1]), for logging; computed on
        each access (a latent teacher decodes it: read it only when logging images)."""
        return self.to_image(self.x0)


class Teacher(Protocol):
    """A frozen guidance model (an ``nn.Module`` with no trainable parameters)."""

    name: str

    def forward(
        self, views: Views, prompts: list[str], step: int, generator: torch.Generator
    ) -> GuidanceOut:
        """Guidance loss for ``views`` of ``len(prompts)`` objects at training ``step``;
        random numbers (timesteps, noise) come from ``generator``."""
        ...


class Denoiser(Protocol):
    """A frozen noise predictor in the teacher's model space (pixels or latents)."""

    def encode_text(self, prompts: list[str]) -> Any:
        """Conditioning for each prompt; the empty prompt "" is the unconditional one."""
        ...

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any, cameras: Cameras | None) -> Tensor:
        """eps (B, C, h, w) predicted for noised inputs x_t (B, C, h, w) at integer
        timesteps t (B,), conditioning ``cond`` (B entries) and the B views' cameras."""
        ...


def assert_frozen(module: torch.nn.Module, name: str) -> None:
    """Fail if ``module`` has any trainable parameter (teachers must stay frozen)."""
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"teacher {name!r} has {len(trainable)} trainable parameters (e.g. {trainable[0]!r}); "
            "call requires_grad_(False) and eval() on its models"
        )
