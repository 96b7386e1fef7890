"""Which teachers a run uses, and building them (the paper's three roles, Sec. 3.4;
docs/teachers.md).

Three roles, each on both render branches: SD 2.1 (one RGB view; the volume branch shows
it the opposite view, as the reference), MVDream (4 RGB views + cameras) and RichDreamer
ND-MV (4 views of normal + depth). Each role has a ``source``: "oracle" — the exact
denoiser of the analytic scenes (``teachers.oracle``), the embedded default — or
"pretrained", a frozen diffusion model from local files (``prd.pretrained_teachers``: SD
from a diffusers-format folder, MVDream and RichDreamer ND-MV from their original
checkpoints or ``prd convert`` folders).

One frozen model per role serves both branches: the two branches' teachers differ only
in their role (the view SD scores) and share the denoiser. ``check_teachers`` reads no
weights, so a run checks every path before it loads anything. ``teachers.offload`` keeps
idle pretrained teachers in host memory (``prd.offload``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prd.offload import HostCopy, attach
from prd.pretrained_teachers import DTYPES, StudentBase, check_pretrained, load

__all__ = ["StudentBase", "TeacherSpec", "TeachersConfig", "build_teachers", "check_teachers"]
from teachers import richdreamer
from teachers.distill import DistillationTeacher
from teachers.guidance import (
    GuidanceConfig,
    mvdream_guidance,
    richdreamer_guidance,
    sd_guidance,
)
from teachers.noise import NoiseSchedule
from teachers.oracle import OracleDenoiser
from teachers.roles import MultiViewNormalDepth, MultiViewRGB, Role, SingleViewRGB

SOURCES = ("oracle", "pretrained")
BRANCHES = ("volume", "mesh")
ROLES = ("sd", "mvdream", "richdreamer")
# The reference's negative prompt of its MVDream and RichDreamer guidance (TriplaneTurbo's
# configs, negative_prompt and negative_prompt_2nd); its SD guidance uses "".
REFERENCE_NEGATIVE_PROMPT = (
    "ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, "
    "and unclear, cropped, lowres, low quality, artifacts, duplicate, morbid, mutilated, "
    "poorly drawn face, deformed, dehydrated, bad proportions"
)


@dataclass
class TeacherSpec:
    """One teacher role."""

    enabled: bool = True
    """Score the renders with this teacher."""
    source: str = "pretrained"
    """"oracle" (analytic scenes, no weights) or "pretrained" (local weights)."""
    pretrained: str | None = None
    """Local weights of a pretrained teacher (SD: a diffusers-format folder; when it is
    the student's base folder, the teacher runs the student's frozen UNet and text encoder
    with the adapters off instead of loading a second copy)."""
    resolution: int = 64
    """Image size the teacher sees (pixels; latent teachers encode it)."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """Loss, timestep and CFG schedules of this teacher."""
    negative_prompt: str | None = None
    """Prompt of CFG's unconditional branch ("": the unconditional one); None: the
    reference's for the role ("" for SD and every oracle, ``REFERENCE_NEGATIVE_PROMPT``
    for pretrained MVDream and RichDreamer)."""
    dtype: str = "auto"
    """Pretrained weights' dtype: "fp32", "bf16", "fp16" or "auto" (fp16 on CUDA as the
    reference; elsewhere the run's frozen dtype: bf16 under train.precision bf16, else
    fp32). Losses are fp32 whatever it is."""
    gradient_checkpointing: bool = False
    """Pretrained latent teachers: recompute the VAE encoder's activations in backward."""
    text_encoder: str | None = None
    """Pretrained MVDream / RichDreamer: a folder with the text_encoder/ and tokenizer/ the
    model was trained with (MVDream: SD 2.1's; None uses the student's, which is that
    encoder. RichDreamer: CLIP ViT-L/14 of an SD-1.5-style folder, required)."""
    vae: str | None = None
    """Pretrained MVDream: a folder whose vae/ (SD's) makes its latents; None: the converted
    checkpoint's folder, else the SD teacher's, else the student's base folder."""
    ldm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Pretrained MVDream / RichDreamer given as an original checkpoint that is not the
    released model: its UNet's constructor arguments (empty: the released config)."""
    depth_radius: float = richdreamer.DEPTH_RADIUS
    """RichDreamer role: depth is normalized between camera distance -+ sqrt(3) x this
    (1 in RichDreamer's guidance and the reference)."""
    supersample: int = 1
    """Oracle only: rays per pixel side of its ground-truth renders (antialiasing)."""

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"teacher source must be one of {SOURCES}, got {self.source!r}")
        if self.depth_radius <= 0:
            raise ValueError(f"teacher depth_radius must be > 0, got {self.depth_radius}")
        if self.resolution < 1 or self.supersample < 1:
            raise ValueError(
                f"teacher resolution and supersample must be >= 1, got "
                f"{self.resolution}, {self.supersample}"
            )
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(
                f"teacher dtype must be auto or one of {list(DTYPES)}, got {self.dtype!r}"
            )
        if self.source == "oracle" and self.negative_prompt:
            raise ValueError(
                "an oracle teacher knows only its scenes' prompts: negative_prompt must be "
                f"'' (its unconditional branch), got {self.negative_prompt!r}"
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
    offload: bool = False
    """Keep each pretrained teacher's own weights (its UNet, its own text encoder, its VAE
    unless shared with a teacher that stays) in host memory while idle, copied to the
    run's device for its own calls only (``prd.offload``); the calls then run teacher by
    teacher. The SD teacher on the student's base folder runs the student's frozen UNet
    and stays on the device, with its VAE. Needs the teachers' early gradients (training
    takes them); worth it on a GPU short of memory, a no-op on the CPU."""

    def __post_init__(self):
        if self.offload and not any(
            getattr(self, r).enabled and getattr(self, r).source == "pretrained" for r in ROLES
        ):
            raise ValueError(
                "teachers.offload moves pretrained teachers' weights; no enabled teacher has "
                "source pretrained (set teachers.offload=false)"
            )


@dataclass
class RoleTeachers:
    """One role's teacher per render branch, all sharing ``denoiser``."""

    name: str
    branches: dict[str, torch.nn.Module]
    denoiser: torch.nn.Module
    weights: tuple[torch.nn.Module, ...] = ()
    """The frozen modules of its own that a pretrained role runs (its denoiser, a latent
    teacher's VAE codec): what ``teachers.offload`` may move. Empty for an oracle."""
    keep_resident: bool = False
    """Stays on the device under ``teachers.offload``: the SD teacher on the student's base
    folder, whose UNet and text encoder are the student's; what it shares (its VAE with
    MVDream) stays too."""
    host: HostCopy | None = None
    """The offloaded tensors' host copies (``prd.offload.attach``); None: not offloaded."""

    def for_branch(self, branch: str) -> torch.nn.Module:
        return self.branches[branch]


def check_teachers(cfg: TeachersConfig, student_folder: str | None = None) -> None:
    """Fail before any weights load or process group starts: at least one role enabled
    (ValueError), and every enabled pretrained teacher's files there (FileNotFoundError
    naming the key, the path and the files expected). ``student_folder``: the student's
    base folder, where MVDream may find its VAE."""
    enabled = [r for r in ROLES if getattr(cfg, r).enabled]
    if not enabled:
        raise ValueError(
            "no teacher enabled: enable at least one of teachers.{sd,mvdream,richdreamer}"
        )
    for role in enabled:
        if getattr(cfg, role).source == "pretrained":
            check_pretrained(role, cfg, student_folder)


def negative_prompt(role: str, spec: TeacherSpec) -> str:
    """The spec's negative prompt, or the reference's for the role and source."""
    if spec.negative_prompt is not None:
        return spec.negative_prompt
    pretrained_multiview = spec.source == "pretrained" and role != "sd"
    return REFERENCE_NEGATIVE_PROMPT if pretrained_multiview else ""


def _role(role: str, spec: TeacherSpec, branch: str, views_per_object: int) -> Role:
    if role == "sd":
        # reference ("sd_oppo_side"): the volume branch's SD guidance scores the opposite side
        return SingleViewRGB(view_offset=views_per_object // 2 if branch == "volume" else 0)
    if role == "mvdream":
        return MultiViewRGB(n_views=4)
    return MultiViewNormalDepth(n_views=4, radius=spec.depth_radius)


def build_teachers(
    cfg: TeachersConfig,
    background,
    views_per_object: int,
    device=None,
    student: StudentBase | None = None,
    frozen_dtype: torch.dtype = torch.float32,
) -> list[RoleTeachers]:
    """The enabled teachers, frozen, on ``device`` (under ``cfg.offload`` the pretrained
    ones idle in host memory, ``prd.offload``): per role one denoiser and one
    DistillationTeacher per render branch. ``background``: the RGB the renders are
    composited over (the oracle's ground truth uses it); ``student``: what a pretrained
    teacher on the student's base folder borrows; ``frozen_dtype``: the dtype of a
    pretrained teacher whose ``dtype`` is "auto" off CUDA (the run's, ``prd.precision``)."""
    check_teachers(cfg, student.folder if student is not None else None)
    teachers = []
    vaes = {}  # SD VAEs by folder: the SD and MVDream teachers share one
    for role in ROLES:
        spec: TeacherSpec = getattr(cfg, role)
        if not spec.enabled:
            continue
        if spec.source == "oracle":
            schedule = NoiseSchedule()
            role_0 = _role(role, spec, "mesh", views_per_object)  # packing: same on both
            denoiser = OracleDenoiser(role_0, schedule, background, spec.supersample).to(device)
            teachers.append(role_teachers(role, spec, denoiser, schedule, views_per_object))
        else:
            m = load(role, cfg, device, student, vaes, frozen_dtype)
            parts = (m.denoiser, m.schedule, views_per_object, m.encode, m.decode)
            teachers.append(
                role_teachers(role, spec, *parts, weights=m.weights, keep_resident=m.keep_resident)
            )
            if cfg.offload:  # before the next role loads: one teacher at a time on the device
                attach(teachers, device if device is not None else "cpu")
    return teachers


def role_teachers(
    role: str,
    spec: TeacherSpec,
    denoiser: torch.nn.Module,
    schedule: NoiseSchedule,
    views_per_object: int,
    encode=None,
    decode=None,
    weights: tuple[torch.nn.Module, ...] = (),
    keep_resident: bool = False,
) -> RoleTeachers:
    """One role's DistillationTeacher per render branch around one shared ``denoiser``
    (encode / decode: a latent teacher's image <-> latent maps; weights, keep_resident:
    what ``teachers.offload`` may move, ``RoleTeachers``)."""
    branches = {
        b: DistillationTeacher(
            name=f"{spec.source}_{role}_{b}",
            role=_role(role, spec, b, views_per_object),
            denoiser=denoiser,
            guidance=spec.guidance,
            resolution=spec.resolution,
            schedule=schedule,
            encode=encode,
            decode=decode,
            negative_prompt=negative_prompt(role, spec),
        )
        for b in BRANCHES
    }
    return RoleTeachers(role, branches, denoiser, tuple(weights), keep_resident)
