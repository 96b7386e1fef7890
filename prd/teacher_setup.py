"""Which teachers a run uses, and building them (docs/teachers.md).

Three roles, each on both render branches: SD 2.1 (one RGB view; the volume branch shows
it the opposite view, as the reference), MVDream (4 RGB views + cameras) and RichDreamer
ND-MV (4 views of normal + depth). Each role has a ``source``: "oracle" — the exact
denoiser of the analytic scenes (``teachers.oracle``), the embedded default — or
"pretrained", a frozen diffusion model from local weights, which arrives with the
teacher converters of the next release and is refused with a clear error until then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from teachers.guidance import (
    GuidanceConfig,
    mvdream_guidance,
    richdreamer_guidance,
    sd_guidance,
)
from teachers.oracle import OracleMVDream, OracleRichDreamer, OracleSD

SOURCES = ("oracle", "pretrained")
BRANCHES = ("volume", "mesh")


@dataclass
class TeacherSpec:
    """One teacher role."""

    enabled: bool = True
    """Score the renders with this teacher."""
    source: str = "pretrained"
    """"oracle" (analytic scenes, no weights) or "pretrained" (local weights)."""
    pretrained: str | None = None
    """Local weights of a pretrained teacher."""
    resolution: int = 64
    """Image size the teacher sees (pixels; latent teachers encode it)."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """Loss, timestep and CFG schedules of this teacher."""
    supersample: int = 1
    """Oracle only: rays per pixel side of its ground-truth renders (antialiasing)."""

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"teacher source must be one of {SOURCES}, got {self.source!r}")
        if self.resolution < 1 or self.supersample < 1:
            raise ValueError(
                f"teacher resolution and supersample must be >= 1, got "
                f"{self.resolution}, {self.supersample}"
            )


@dataclass
class TeachersConfig:
    """The three teacher roles of the reference (each weight 1)."""

    sd: TeacherSpec = field(
        default_factory=lambda: TeacherSpec(resolution=512, guidance=sd_guidance())
    )
    """Stable Diffusion 2.1-base: one RGB view, 512 px, CFG 7.5."""
    mvdream: TeacherSpec = field(
        default_factory=lambda: TeacherSpec(resolution=256, guidance=mvdream_guidance())
    )
    """MVDream sd-v2.1-base-4view: 4 RGB views + cameras, 256 px, CFG 20 -> 10."""
    richdreamer: TeacherSpec = field(
        default_factory=lambda: TeacherSpec(resolution=32, guidance=richdreamer_guidance())
    )
    """RichDreamer ND-MV: 4 views of normal + depth, 32 px, CFG 20."""


@dataclass
class RoleTeachers:
    """One role's teacher per render branch (they differ only in the view SD scores)."""

    name: str
    branches: dict[str, torch.nn.Module]

    def for_branch(self, branch: str) -> torch.nn.Module:
        return self.branches[branch]


def _oracle(role: str, spec: TeacherSpec, branch: str, background, views_per_object: int):
    common = dict(
        guidance=spec.guidance,
        resolution=spec.resolution,
        background=background,
        supersample=spec.supersample,
    )
    if role == "sd":
        # reference: the volume branch's SD guidance scores the opposite side
        offset = views_per_object // 2 if branch == "volume" else 0
        return OracleSD(view_offset=offset, name=f"oracle_sd_{branch}", **common)
    if role == "mvdream":
        return OracleMVDream(name=f"oracle_mvdream_{branch}", **common)
    return OracleRichDreamer(name=f"oracle_richdreamer_{branch}", **common)


def build_teachers(
    cfg: TeachersConfig, background, views_per_object: int, device=None
) -> list[RoleTeachers]:
    """The enabled teachers, frozen, on ``device``."""
    teachers = []
    for role in ("sd", "mvdream", "richdreamer"):
        spec: TeacherSpec = getattr(cfg, role)
        if not spec.enabled:
            continue
        if spec.source == "pretrained":
            raise ValueError(
                f"teachers.{role}.source=pretrained: loading {role} weights is not in this "
                f"release; use teachers.{role}.source=oracle or teachers.{role}.enabled=false"
            )
        branches = {
            b: _oracle(role, spec, b, background, views_per_object).to(device) for b in BRANCHES
        }
        teachers.append(RoleTeachers(role, branches))
    if not teachers:
        raise ValueError(
            "no teacher enabled: enable at least one of teachers.{sd,mvdream,richdreamer}"
        )
    return teachers
