"""The SD teacher's cost: one call on both render branches, and the memory of sharing.

``time``: one SD-teacher call on both branches (volume and mesh renders of B objects x 4
views, each branch's view packed, resized to the teacher's resolution, VAE-encoded with
gradients, CFG eps of the UNet, ASD loss), forward + backward to the renders, random
weights built in code. ``--arch tiny``: the tiny SD, renders 32 / 64 px, teacher 32 px;
``--arch sd21``: SD 2.1-base shapes, renders 128 px (the volume branch's ray grid) and
512 px (mesh), teacher 512 px, B = 2 (the reference's prompts per GPU).

``rss``: peak RSS of building the student (PETA on SD) and the SD teacher in this
process, the teacher either sharing the student's UNet and text encoder (``shared``, what
a teacher on the student's base folder does) or holding its own (``separate``). Run each
in its own process so the peaks are clean. Weights are built in code (random), so no SD
folder is needed; the shapes, hence the memory, are those of the real models.

    python -m bench.sd_teacher time --arch tiny [--repeats 3]
    python -m bench.sd_teacher time --arch sd21 [--no-checkpointing]
    python -m bench.sd_teacher rss --arch sd21 --weights shared
    python -m bench.sd_teacher rss --arch sd21 --weights separate
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from bench.rss import peak_rss_gib
from prd.arch import ARCH_CONFIGS, sd_scheduler
from prd.pretrained_teachers import StudentBase
from prd.student import StudentConfig, build_student
from prd.teacher_setup import TeacherSpec, role_teachers
from prompts.tokenizer import build_clip_tokenizer
from renderers.cameras import CameraSampling, sample_cameras
from teachers.base import Views
from teachers.guidance import sd_guidance
from teachers.sd import SDDenoiser

# (render px of the volume branch, of the mesh branch, teacher px, objects)
SHAPES = {"tiny": (32, 64, 32, 2), "sd21": (128, 512, 512, 2)}


def teacher_in_code(arch: str, checkpointing: bool, student: StudentBase | None = None):
    """The SD denoiser of ``arch`` with random weights (seeded), or sharing ``student``'s."""
    unet_cfg, vae_cfg, text_cfg = ARCH_CONFIGS[arch]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(**vae_cfg)
        if student is None:
            text, unet = CLIPTextModel(CLIPTextConfig(**text_cfg)), UNet2DConditionModel(**unet_cfg)
            borrowed = text_fn = None
        else:
            text, unet = student.text_encoder, student.unet
            borrowed, text_fn = student.unet_context, student.text_fn
    return SDDenoiser(
        build_clip_tokenizer(), text, unet, vae, sd_scheduler(), borrowed, text_fn, checkpointing
    )


def views_at(n_objects: int, size: int, gen: torch.Generator) -> Views:
    cams = sample_cameras(n_objects, CameraSampling(), gen)
    n = len(cams)
    rgb = torch.rand(n, size, size, 3, generator=gen).requires_grad_(True)
    normal = torch.nn.functional.normalize(torch.randn(n, size, size, 3, generator=gen), dim=-1)
    return Views(rgb, torch.ones(n, size, size), torch.ones(n, size, size), normal, cams, 4)


def bench_time(arch: str, repeats: int, checkpointing: bool) -> dict:
    vol_px, mesh_px, teacher_px, b = SHAPES[arch]
    t0 = time.perf_counter()
    denoiser = teacher_in_code(arch, checkpointing)
    build_s = time.perf_counter() - t0
    spec = TeacherSpec(resolution=teacher_px, guidance=sd_guidance())
    role = role_teachers("sd", spec, denoiser, denoiser.schedule, 4, *(
        denoiser.encode_images, denoiser.decode_latents))  # fmt: skip
    prompts = [f"a photo of object {i}" for i in range(b)]
    gen = torch.Generator().manual_seed(0)
    renders = {"volume": views_at(b, vol_px, gen), "mesh": views_at(b, mesh_px, gen)}
    times = []
    for _ in range(repeats):
        for v in renders.values():
            v.rgb.grad = None
        start = time.perf_counter()
        loss = sum(role.for_branch(br)(v, prompts, 0, gen).loss for br, v in renders.items())
        loss.backward()
        times.append(time.perf_counter() - start)
    assert all(v.rgb.grad is not None and v.rgb.grad.abs().sum() > 0 for v in renders.values())
    return {
        "arch": arch,
        "objects": b,
        "renders_px": [vol_px, mesh_px],
        "teacher_px": teacher_px,
        "vae_checkpointing": checkpointing,
        "build_s": round(build_s, 2),
        "call_s": [round(t, 2) for t in times],
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }


def bench_rss(arch: str, weights: str) -> dict:
    cfg = StudentConfig(arch=arch, allow_random_sd21=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        student = build_student(cfg)
    after_student = peak_rss_gib()
    base = None
    if weights == "shared":
        base = StudentBase(None, student.unet, student.text_encoder, student.base_unet,
                           student.encode_text)  # fmt: skip
    denoiser = teacher_in_code(arch, True, base)
    owned = sum(p.numel() for p in denoiser.parameters())
    return {
        "arch": arch,
        "weights": weights,
        "teacher_owned_params": owned,
        "peak_rss_after_student_gib": round(after_student, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("time", "rss"))
    p.add_argument("--arch", choices=tuple(SHAPES), default="tiny")
    p.add_argument("--weights", choices=("shared", "separate"), default="shared")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-checkpointing", action="store_true", help="VAE encoder activations kept")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "time":
        print(json.dumps(bench_time(args.arch, args.repeats, not args.no_checkpointing)))
    else:
        print(json.dumps(bench_rss(args.arch, args.weights)))


if __name__ == "__main__":
    main()
