"""Oracle teachers: exact denoisers of the analytic scenes, in the real teachers' roles.

For a noised packed input x_t at timestep t, the oracle renders the prompt's ground truth
from the same cameras at the input's resolution, packs it with the teacher's role into
x0_gt and returns the exact eps = (x_t - alpha_t x0_gt) / sigma_t. The unconditional
branch ("") uses x0 = the mean over all 36 vocabulary scenes rendered from the same
cameras, so classifier-free guidance acts as with a real model. Nothing is cached: every
call renders afresh (sphere tracing, ``teachers.scenes``).

The mean over the vocabulary needs 6 renders per view, not 36: colours enter the RGB
packing affinely (rgb = mask * colour + (1 - mask) * background), so the mean over the six
colours of a shape is that shape rendered in the mean colour; normals and depth do not
depend on colour.
"""

from __future__ import annotations

import torch
from torch import Tensor

from renderers.cameras import Cameras
from teachers.base import Views
from teachers.distill import DistillationTeacher
from teachers.guidance import (
    GuidanceConfig,
    mvdream_guidance,
    richdreamer_guidance,
    sd_guidance,
)
from teachers.noise import NoiseSchedule
from teachers.roles import MultiViewNormalDepth, MultiViewRGB, Role, SingleViewRGB
from teachers.scenes import (
    ALL_PROMPTS,
    COLORS,
    HELDOUT_PROMPTS,
    SHAPES,
    TRAIN_PROMPTS,
    OracleField,
    parse_prompt,
    render_scenes,
    sample_surface,
    scene_color,
    scene_sdf,
)

__all__ = [
    "ALL_PROMPTS",
    "COLORS",
    "HELDOUT_PROMPTS",
    "SHAPES",
    "TRAIN_PROMPTS",
    "OracleDenoiser",
    "OracleField",
    "OracleMVDream",
    "OracleRichDreamer",
    "OracleSD",
    "sample_surface",
    "scene_color",
    "scene_sdf",
]

_MEAN_COLOR = torch.tensor(list(COLORS.values())).mean(dim=0)


class OracleDenoiser(torch.nn.Module):
    """The exact eps predictor of the oracle scenes in a role's packed space (no parameters).

    role: the packing of the teacher it serves; background: RGB the scenes are composited
    over (must match the student's renderer); supersample: rays per pixel side (1: one ray
    through each pixel centre; 2+: box-filtered, antialiased silhouettes).
    """

    def __init__(
        self,
        role: Role,
        schedule: NoiseSchedule,
        background=(0.5, 0.5, 0.5),
        supersample: int = 1,
    ):
        super().__init__()
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        self.role = role
        self.schedule = schedule
        self.background = tuple(float(b) for b in background)
        self.supersample = supersample

    def encode_text(self, prompts: list[str]) -> list[str]:
        """The oracle's conditioning is the prompt itself; fails on an unknown word."""
        for p in prompts:
            if p != "":
                parse_prompt(p)
        return list(prompts)

    def ground_truth(self, prompts: list[str], cameras: Cameras, size: int) -> Tensor:
        """x0 (B, C, size, size) in the role's space: prompt b's scene from camera b, or the
        vocabulary mean for the empty prompt."""
        shapes, colors, cam_index, owner = [], [], [], []
        for i, p in enumerate(prompts):
            if p == "":
                for s in SHAPES:
                    shapes.append(s)
                    colors.append(_MEAN_COLOR)
                    cam_index.append(i)
                    owner.append(i)
            else:
                shapes.append(parse_prompt(p)[1])
                colors.append(scene_color(p))
                cam_index.append(i)
                owner.append(i)
        dev = cameras.device
        cams = cameras.index(torch.tensor(cam_index, device=dev))
        r = render_scenes(
            shapes, torch.stack(colors).to(dev), cams, size, self.background, self.supersample
        )
        views = Views(r.rgb, r.mask, r.depth, r.normal, cams, views_per_object=1)
        packed = self.role.encode(views, size)
        # Average the entries of each prompt (one for a scene, six for the vocabulary mean).
        own = torch.tensor(owner, device=dev)
        total = torch.zeros(len(prompts), *packed.shape[1:], dtype=packed.dtype, device=dev)
        total.index_add_(0, own, packed)
        count = torch.bincount(own, minlength=len(prompts)).to(packed.dtype)
        return total / count.view(-1, 1, 1, 1)

    def forward(self, x_t: Tensor, t: Tensor, cond: list[str], cameras: Cameras | None) -> Tensor:
        """Exact eps (B, C, h, w) for x_t (B, C, h, w) at timesteps t (B,)."""
        if cameras is None or len(cameras) != x_t.shape[0] or len(cond) != x_t.shape[0]:
            raise ValueError(
                f"oracle denoiser: x_t has {x_t.shape[0]} samples, got {len(cond)} prompts "
                f"and {None if cameras is None else len(cameras)} cameras"
            )
        if x_t.shape[-1] != x_t.shape[-2]:
            raise ValueError(f"oracle denoiser: square inputs only, got {tuple(x_t.shape)}")
        x0 = self.ground_truth(cond, cameras.to(dtype=torch.float32), x_t.shape[-1])
        return self.schedule.eps_from_x0(x_t, x0.to(x_t), t)


def _oracle(name, role, guidance, resolution, background, supersample):
    schedule = NoiseSchedule()
    denoiser = OracleDenoiser(role, schedule, background, supersample)
    return dict(
        name=name,
        role=role,
        denoiser=denoiser,
        guidance=guidance,
        resolution=resolution,
        schedule=schedule,
    )


class OracleSD(DistillationTeacher):
    """Stable Diffusion's role (one RGB view per object, number ``view_offset``), oracle eps."""

    def __init__(
        self,
        guidance: GuidanceConfig | None = None,
        resolution: int = 64,
        view_offset: int = 0,
        background=(0.5, 0.5, 0.5),
        supersample: int = 1,
        name: str = "oracle_sd",
    ):
        role = SingleViewRGB(view_offset=view_offset)
        guidance = guidance if guidance is not None else sd_guidance()
        super().__init__(**_oracle(name, role, guidance, resolution, background, supersample))


class OracleMVDream(DistillationTeacher):
    """MVDream's role (4 RGB views per object with cameras), oracle eps."""

    def __init__(
        self,
        guidance: GuidanceConfig | None = None,
        resolution: int = 32,
        background=(0.5, 0.5, 0.5),
        supersample: int = 1,
        name: str = "oracle_mvdream",
    ):
        role = MultiViewRGB(n_views=4)
        guidance = guidance if guidance is not None else mvdream_guidance()
        super().__init__(**_oracle(name, role, guidance, resolution, background, supersample))


class OracleRichDreamer(DistillationTeacher):
    """RichDreamer ND-MV's role (4 views of normal + depth), oracle eps."""

    def __init__(
        self,
        guidance: GuidanceConfig | None = None,
        resolution: int = 32,
        radius: float = 0.5,
        background=(0.5, 0.5, 0.5),
        supersample: int = 1,
        name: str = "oracle_richdreamer",
    ):
        role = MultiViewNormalDepth(n_views=4, radius=radius)
        guidance = guidance if guidance is not None else richdreamer_guidance()
        super().__init__(**_oracle(name, role, guidance, resolution, background, supersample))
