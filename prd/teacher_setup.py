"""Which teachers a run uses, and building them (the paper's three roles, Sec. 3.4;
docs/teachers.md).

Three roles, each on both render branches: SD 2.1 (one RGB view; the volume branch shows
it the opposite view, as the reference), MVDream (4 RGB views + cameras) and RichDreamer
ND-MV (4 views of normal + depth). Each role has a ``source``: "oracle" — the exact
denoiser of the analytic scenes (``teachers.oracle``), the embedded default — or
"pretrained", a frozen diffusion model from a local folder: SD from a diffusers-format
folder (``teachers.sd``); MVDream and RichDreamer arrive with their converters in the
next release and are refused with a clear error until then.

One frozen model per role serves both branches: the two branches' teachers differ only
in their role (the view SD scores) and share the denoiser. ``check_teachers`` reads no
weights, so a run checks every folder before it loads anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from teachers import sd
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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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
    reference, fp32 on CPU). Losses are fp32 whatever it is."""
    gradient_checkpointing: bool = False
    """Pretrained latent teachers: recompute the VAE encoder's activations in backward."""
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


@dataclass
class RoleTeachers:
    """One role's teacher per render branch, all sharing ``denoiser``."""

    name: str
    branches: dict[str, torch.nn.Module]
    denoiser: torch.nn.Module

    def for_branch(self, branch: str) -> torch.nn.Module:
        return self.branches[branch]


@dataclass
class StudentBase:
    """What a teacher may borrow from the student: its base folder, its UNet as the
    pretrained model (``unet_context``), and its prompt encoding (``text_fn``)."""

    folder: str | None
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    unet_context: Callable
    text_fn: Callable[[list[str]], torch.Tensor]


def _same_folder(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def check_teachers(cfg: TeachersConfig) -> None:
    """Fail before any weights load or process group starts: every enabled pretrained
    teacher has a complete folder (FileNotFoundError naming the path and the expected
    files), and no enabled role lacks a loader (ValueError)."""
    enabled = [r for r in ROLES if getattr(cfg, r).enabled]
    if not enabled:
        raise ValueError(
            "no teacher enabled: enable at least one of teachers.{sd,mvdream,richdreamer}"
        )
    for role in enabled:
        spec: TeacherSpec = getattr(cfg, role)
        if spec.source != "pretrained":
            continue
        if role != "sd":
            raise ValueError(
                f"teachers.{role}.source=pretrained: loading {role} weights is not in this "
                f"release; use teachers.{role}.source=oracle or teachers.{role}.enabled=false"
            )
        if spec.pretrained is None:
            raise ValueError(
                f"teachers.{role}.pretrained is not set: point it at a local diffusers-format "
                "stable-diffusion-2-1-base folder (e.g. the student's base folder)"
            )
        sd.check_sd_folder(spec.pretrained, f"teachers.{role}.pretrained")


def resolve_dtype(spec: TeacherSpec, device) -> torch.dtype:
    """The spec's dtype; "auto" is fp16 on CUDA (the reference) and fp32 elsewhere."""
    if spec.dtype == "auto":
        return torch.float16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    return DTYPES[spec.dtype]


def sd_denoiser(spec: TeacherSpec, device, student: StudentBase | None) -> sd.SDDenoiser:
    """The SD role's frozen denoiser: the student's base weights when ``spec.pretrained``
    is the student's folder, else the folder's weights in the spec's dtype."""
    if student is not None and _same_folder(spec.pretrained, student.folder):
        tokenizer, _, _, vae, scheduler = sd.load_parts(
            spec.pretrained, resolve_dtype(spec, device), "teachers.sd.pretrained", unet=False
        )
        return sd.SDDenoiser(
            tokenizer,
            student.text_encoder,
            student.unet,
            vae,
            scheduler,
            borrowed=student.unet_context,
            text_fn=student.text_fn,
            gradient_checkpointing=spec.gradient_checkpointing,
            where=f"teachers.sd.pretrained={spec.pretrained}",
        ).to(device)
    denoiser = sd.load_pretrained(
        spec.pretrained, resolve_dtype(spec, device), spec.gradient_checkpointing
    )
    return denoiser.to(device)


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
    return MultiViewNormalDepth(n_views=4)


def build_teachers(
    cfg: TeachersConfig,
    background,
    views_per_object: int,
    device=None,
    student: StudentBase | None = None,
) -> list[RoleTeachers]:
    """The enabled teachers, frozen, on ``device``: per role one denoiser and one
    DistillationTeacher per render branch. ``background``: the RGB the renders are
    composited over (the oracle's ground truth uses it); ``student``: what a pretrained
    teacher on the student's base folder borrows."""
    check_teachers(cfg)
    teachers = []
    for role in ROLES:
        spec: TeacherSpec = getattr(cfg, role)
        if not spec.enabled:
            continue
        if spec.source == "oracle":
            schedule = NoiseSchedule()
            role_0 = _role(role, spec, "mesh", views_per_object)  # packing: same on both
            denoiser = OracleDenoiser(role_0, schedule, background, spec.supersample).to(device)
            teachers.append(role_teachers(role, spec, denoiser, schedule, views_per_object))
        else:  # check_teachers refused the roles without a loader
            denoiser = sd_denoiser(spec, device, student)
            latent = (denoiser.encode_images, denoiser.decode_latents)
            teachers.append(
                role_teachers(role, spec, denoiser, denoiser.schedule, views_per_object, *latent)
            )
    return teachers


def role_teachers(
    role: str,
    spec: TeacherSpec,
    denoiser: torch.nn.Module,
    schedule: NoiseSchedule,
    views_per_object: int,
    encode=None,
    decode=None,
) -> RoleTeachers:
    """One role's DistillationTeacher per render branch around one shared ``denoiser``
    (encode / decode: a latent teacher's image <-> latent maps)."""
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
    return RoleTeachers(role, branches, denoiser)
