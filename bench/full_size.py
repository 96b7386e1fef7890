"""The paper's full configuration built in code with random weights, and one training step
of it with a hook after every phase (``bench.train_step`` times the phases,
``bench.memory`` reads the process's peak RSS after them).

Models (real shapes, random weights): the SD 2.1-base student with PETA; the SD teacher
sharing the student's UNet (adapters off) and text encoder, with its own VAE
(``bench.sd_teacher.teacher_in_code``); MVDream's released UNet on the student's text
encoder and the SD teacher's VAE; ND-MV's released UNet with a CLIP ViT-L/14 text encoder
(12 layers, width 768). Frozen networks in ``frozen_dtype`` (``prd.precision``).

The step follows ``prd.train`` (one progressive step k, whose graph backward frees before
the next k: the loop's memory peak is one k's): text, student UNet, VAE decode, volume
branch, mesh branch, each teacher on each branch (each teacher's activations are freed
when its call returns: ASD's teacher pass is gradient-free, and the gradient with respect
to the renders is taken at once, freeing the VAE encoder's graph), backward, optimizer
step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from bench.rss import peak_rss_gib, rss_gib
from bench.sd_teacher import teacher_in_code
from prd import precision
from prd.branches import render_branches, score_branches
from prd.config import Config, load
from prd.model import PRDModel, build_model
from prd.offload import attach
from prd.pretrained_teachers import StudentBase
from prd.progressive import progressive_timesteps
from prd.teacher_setup import RoleTeachers, build_teachers, role_teachers
from prd.train import make_optimizer, regularization
from prompts.tokenizer import build_clip_tokenizer
from renderers.cameras import sample_cameras
from teachers import multiview_unet as mv
from teachers import mvdream, richdreamer
from teachers.noise import NoiseSchedule
from teachers.sd import LatentCodec

PROMPTS = ["a red ceramic teapot", "a wooden chair with a woven seat"]
# CLIP ViT-L/14's text tower (SD 1.5's text_encoder/config.json), which ND-MV conditions on
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
RANDOM = ["student.pretrained=null", "student.allow_random_sd21=true"]


def full_config(files: list[str], overrides: list[str]) -> Config:
    """The config of ``files`` with a random-weight student (``RANDOM``) and ``overrides``."""
    return load(files, [*RANDOM, *overrides])


def _multiview(module, text_fn=None, text_encoder=None, dtype=torch.float32):
    unet = mv.MultiViewUNet.build(mv.unet_config(module.RELEASED)).to(dtype)
    tokenizer = build_clip_tokenizer() if text_encoder is not None else None
    return mvdream.MultiViewDenoiser(
        unet, text_encoder, tokenizer, module.camera_condition, text_fn=text_fn
    )


def build_teachers_in_code(
    cfg: Config, model: PRDModel, frozen_dtype: torch.dtype, on_phase: Callable = print
) -> list[RoleTeachers]:
    """The enabled roles of ``cfg.teachers`` with random weights at the released shapes
    (module docstring); ``on_phase(name)`` after each is built. Under
    ``teachers.offload`` their own weights go to host copies (``prd.offload``; on the
    CPU this moves nothing)."""
    student = model.student
    base = StudentBase(
        None, student.unet, student.text_encoder, student.base_unet, student.encode_text
    )
    out, n_views = [], cfg.cameras.n_views
    sd_den = None
    with torch.random.fork_rng():
        torch.manual_seed(1)
        if cfg.teachers.sd.enabled or cfg.teachers.mvdream.enabled:
            sd_den = teacher_in_code("sd21", cfg.teachers.sd.gradient_checkpointing, base)
            sd_den.vae.to(frozen_dtype)
        if cfg.teachers.sd.enabled:
            spec = cfg.teachers.sd
            out.append(
                role_teachers(
                    "sd",
                    spec,
                    sd_den,
                    sd_den.schedule,
                    n_views,
                    *(sd_den.encode_images, sd_den.decode_latents),
                    weights=(sd_den,),
                    keep_resident=True,  # the student's UNet and text encoder
                )  # fmt: skip
            )
            on_phase("build_sd_teacher")
        if cfg.teachers.mvdream.enabled:
            spec = cfg.teachers.mvdream
            den = _multiview(mvdream, text_fn=student.encode_text, dtype=frozen_dtype)
            codec = LatentCodec(sd_den.vae, spec.gradient_checkpointing, "MVDream")
            out.append(
                role_teachers(
                    "mvdream",
                    spec,
                    den,
                    NoiseSchedule(),
                    n_views,
                    *(codec.encode_images, codec.decode_latents),
                    weights=(den, codec),
                )  # fmt: skip
            )
            on_phase("build_mvdream_teacher")
        if cfg.teachers.richdreamer.enabled:
            text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).to(frozen_dtype)
            den = _multiview(richdreamer, text_encoder=text.requires_grad_(False).eval(),
                             dtype=frozen_dtype)  # fmt: skip
            spec = cfg.teachers.richdreamer
            out.append(
                role_teachers("richdreamer", spec, den, NoiseSchedule(), n_views, weights=(den,))
            )
            on_phase("build_richdreamer_teacher")
    if cfg.teachers.offload:
        attach(out, "cpu")
    return out


def model_report(model: PRDModel, teachers: list[RoleTeachers]) -> dict[str, dict]:
    """Parameter count and dtypes of every network, each counted once (the SD teacher's
    UNet and text encoder are the student's; MVDream's VAE is the SD teacher's)."""
    nets: dict[str, torch.nn.Module] = {
        "student.unet (base + PETA)": model.student.unet,
        "student.vae_decoder (base + PETA + conv_out)": torch.nn.ModuleList(
            [model.student.post_quant_conv, model.student.decoder]
        ),
        "student.text_encoder (SD 2.1, OpenCLIP ViT-H text)": model.student.text_encoder,
        "field MLPs": model.decoder,
    }
    if model.background is not None:
        nets["learned background"] = model.background
    for role in teachers:
        den = role.denoiser
        if not any(True for _ in den.parameters()):
            continue  # an oracle: analytic scenes, no network
        if role.name == "sd":
            nets["teacher sd: vae (shared with mvdream)"] = den.vae
        else:
            nets[f"teacher {role.name}: unet"] = den.unet
            if den.text_encoder is not None:
                nets[f"teacher {role.name}: text_encoder (CLIP ViT-L/14)"] = den.text_encoder
    report, seen = {}, set()
    for name, net in nets.items():
        params = [p for p in net.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        by_dtype: dict[str, int] = {}
        for p in params:
            key = f"{str(p.dtype).removeprefix('torch.')}{'' if p.requires_grad else ' frozen'}"
            by_dtype[key] = by_dtype.get(key, 0) + p.numel()
        report[name] = {
            "parameters": sum(p.numel() for p in params),
            "bytes": sum(p.numel() * p.element_size() for p in params),
            "by_dtype": by_dtype,
        }
    return report


def build(cfg: Config, on_phase: Callable[[str], None], seed: int = 0):
    """(model, teachers, optimizer, frozen dtype) of ``cfg`` in code: pretrained roles
    with random weights (``build_teachers_in_code``), or oracle ones as training builds
    them; a mix of the two is not supported."""
    frozen = precision.frozen_dtype(cfg.train.precision)
    model = build_model(cfg, dtype=frozen, seed=seed)
    on_phase("build_student")
    roles = [getattr(cfg.teachers, r) for r in ("sd", "mvdream", "richdreamer")]
    if not any(s.enabled for s in roles):
        teachers = []
    elif all(s.source == "oracle" for s in roles if s.enabled):
        teachers = build_teachers(cfg.teachers, cfg.train.background, cfg.cameras.n_views)
        on_phase("build_oracle_teachers")
    else:
        teachers = build_teachers_in_code(cfg, model, frozen, on_phase)
    precision.check_trainable_fp32(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, teachers, make_optimizer(cfg, trainable), frozen


def one_step(
    cfg: Config,
    model: PRDModel,
    teachers: list[RoleTeachers],
    optimizer,
    on_phase: Callable[[str], None],
    k: int = 0,
    step: int = 0,
    seed: int = 0,
    early_teacher_grads: bool = True,
) -> dict[str, float]:
    """Progressive step ``k`` (0-based; its timestep) of training step ``step`` for the
    prompts of ``PROMPTS`` (first ``train.batch_size``), backward and the optimizer step;
    ``on_phase(name)`` after each phase. Returns the losses.

    The renders and teacher calls are the training loop's (``prd.branches``:
    ``render_branches``, ``score_branches``). early_teacher_grads: each teacher loss's
    gradient with respect to the renders is taken right after its call, as in training;
    False keeps every teacher's graph until the backward (the lever's baseline)."""
    gen = torch.Generator().manual_seed(seed)
    b, planes = cfg.train.batch_size, cfg.student.planes
    if cfg.prompts.prompts or cfg.prompts.file:  # e.g. an oracle's scenes
        given = cfg.prompts.resolve()
    else:
        given = PROMPTS
    prompts = (list(given) * b)[:b]
    size = cfg.student.resolved_latent_size()
    t_k = progressive_timesteps(cfg.train.progressive_steps)[k]
    text = model.student.encode_text(prompts)
    background = torch.tensor(cfg.train.background)
    backdrop = model.backdrop(prompts, text, background)
    on_phase("text_encode")
    z = torch.randn(b * planes, 4, size, size, generator=gen)
    t = torch.full((b * planes,), t_k, dtype=torch.long)
    with precision.autocast(cfg.train.precision, "cpu"):
        x0 = model.student.predict_x0(z, t, text)
    on_phase("student_unet")
    with precision.autocast(cfg.train.precision, "cpu"):
        geometry, texture = model.student.decode(x0)
    field = model.field(geometry.float(), texture.float())
    on_phase("vae_decode")
    cams = sample_cameras(b, cfg.cameras, gen)
    branches = render_branches(
        field, cams, cfg, gen, backdrop, step, on_branch=lambda name: on_phase(f"{name}_branch")
    )
    scores = score_branches(
        branches,
        teachers,
        prompts,
        step,
        gen,
        early_grads=early_teacher_grads,
        on_score=lambda teacher, branch: on_phase(f"teacher_{teacher}_{branch}"),
        offload=cfg.teachers.offload,
    )
    loss = scores.loss + regularization(branches["volume"].regularizers, cfg.train, step)
    loss.backward()
    on_phase("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    on_phase("optimizer")
    return {f"{t}/{b}": v.item() for (t, b), v in scores.losses.items()}


class PhaseLog:
    """After each phase: the wall time since the previous one, the process's peak RSS so
    far (``ru_maxrss``, the OS's figure) and its current RSS."""

    def __init__(self, echo: bool = True):
        self.rows: list[dict] = []
        self.echo = echo
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        row = {
            "phase": name,
            "seconds": round(now - self._t, 3),
            "peak_rss_gib": round(peak_rss_gib(), 3),
            "rss_gib": round(rss_gib(), 3),
        }
        self.rows.append(row)
        self._t = now
        if self.echo:
            print(f"  {name:34s} {row['seconds']:9.2f} s   peak RSS {row['peak_rss_gib']:6.2f} GiB"
                  f"   RSS {row['rss_gib']:6.2f} GiB", flush=True)  # fmt: skip
