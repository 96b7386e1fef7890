"""Memory of one training step of the paper's full configuration (random weights, real
shapes; ``bench.full_size``): the parameter count and dtype of every network, and the
process's peak RSS (the OS's figure) after each phase: build, student UNet, decode, each
branch, each teacher, backward, optimizer.

    MALLOC_MMAP_THRESHOLD_=131072 python -m bench.memory [--json FILE]
        [--teachers all|none|sd,mvdream,...] [--late-teacher-grads] [key=value ...]

(the environment setting makes glibc return freed large blocks to the OS, so the current
RSS printed beside the peak follows the live tensors; the peak is the OS's either way)

Defaults: configs/sd21.yaml (SD 2.1 student with PETA, batch 2, NeuS 40^2 patch + 42^2
global at 128 + 64 samples, mesh 128^3 grid + 512 px raster, SD teacher at 512 px on the
shared base, MVDream at 256 px, ND-MV at 32 px) at train.precision fp32. One progressive
step k: the loop backpropagates each k's loss before the next and keeps only the detached
x0, so a step's peak is one k's (``prd.train``). Levers are config overrides measured
run against run, e.g. ``train.precision=bf16`` (frozen weights bf16),
``student.gradient_checkpointing=false``, ``teachers.sd.gradient_checkpointing=false``,
``volume.chunk_rays=1024``, ``student.decode_chunk=0`` (the decode as one pass, its
up-blocks checkpointed), ``mesh.view_chunk=0`` (the raster graph of all views at once),
and ``--late-teacher-grads`` (every teacher graph kept until the backward, where training
takes each teacher's gradient at once). ``--teachers none`` replaces the teachers by a stand-in loss
(the mean of every rendered channel) whose backward runs through both branches and the
student: the student side's share, measurable in a process of its own; one role alone
(``--teachers sd``) adds that teacher. Run one configuration per process (peak RSS is the
process's).

Every run also reports the CPU offload lever (``teachers.offload``, ``prd.offload``) from
the built teachers: the bytes it keeps off the device (the offloaded teachers' parameters
and buffers at their stored dtype, each once) and the bytes it copies in per progressive
step, with that copy's time at PCIe 4.0 x16's ~25 GB/s. On the CPU it moves nothing, so
its memory is not measured here. ``--offload-estimate fp16`` prints the same figures for
the released shapes at a dtype without building anything (meta device, seconds).
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch

from bench.full_size import CLIP_L_TEXT, PhaseLog, build, full_config, model_report, one_step
from prd.offload import PCIE4_X16_BYTES_PER_S, offloaded_bytes
from prd.pretrained_teachers import DTYPES
from prd.teacher_setup import ROLES, RoleTeachers

GIB = 2**30


class StandIn:
    """A loss on every rendered channel with the teachers' interface, weights-free."""

    name = "stand_in"

    def for_branch(self, branch):
        def loss(views, prompts, step, gen):
            total = views.rgb.mean() + views.mask.mean() + views.depth.mean()
            return SimpleNamespace(loss=total + views.normal.mean())

        return loss


def offload_report(teachers: list) -> dict:
    """The offload lever's figures for ``teachers`` (module docstring)."""
    roles = [t for t in teachers if isinstance(t, RoleTeachers)]
    moved = offloaded_bytes(roles)
    return {
        "kept_off_bytes": moved["kept_off"],
        "kept_off_gib": round(moved["kept_off"] / GIB, 3),
        "moved_per_step_bytes": moved["moved_per_step"],
        "transfer_s_per_step_pcie4_x16": round(moved["moved_per_step"] / PCIE4_X16_BYTES_PER_S, 4),
    }


def released_roles(dtype: torch.dtype) -> list[RoleTeachers]:
    """The paper's pretrained roles at the released shapes on the meta device (no memory):
    the SD teacher on the student's base (its VAE, kept resident), MVDream (UNet + that
    VAE; the student's text encoder), ND-MV (UNet + CLIP ViT-L/14 text encoder)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from prd.arch import ARCH_CONFIGS
    from teachers import multiview_unet as mv
    from teachers import mvdream, richdreamer

    with torch.device("meta"):
        vae = AutoencoderKL(**ARCH_CONFIGS["sd21"][1]).to(dtype)
        mv_unet = mv.MultiViewUNet.build(mv.unet_config(mvdream.RELEASED)).to(dtype)
        nd_unet = mv.MultiViewUNet.build(mv.unet_config(richdreamer.RELEASED)).to(dtype)
        nd_text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).to(dtype)
    return [
        RoleTeachers("sd", {}, vae, (vae,), keep_resident=True),
        RoleTeachers("mvdream", {}, mv_unet, (mv_unet, vae)),
        RoleTeachers("richdreamer", {}, nd_unet, (nd_unet, nd_text)),
    ]


def print_offload(report: dict) -> None:
    print(f"  teachers.offload: keeps {report['kept_off_gib']:.3f} GiB "
          f"({report['kept_off_bytes'] / 1e9:.3f} GB) off the device; copies "
          f"{report['moved_per_step_bytes'] / 1e9:.3f} GB in per progressive step, "
          f"{report['transfer_s_per_step_pcie4_x16']:.3f} s at 25 GB/s (PCIe 4.0 x16)",
          flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--teachers", default="all", help="all, none, or roles (comma-separated)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the report to this file")
    p.add_argument(
        "--late-teacher-grads",
        action="store_true",
        help="keep every teacher's graph until the backward (training frees each at once)",
    )
    p.add_argument(
        "--offload-estimate",
        choices=list(DTYPES),
        help="only print the offload lever's figures for the released shapes at this dtype",
    )
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.offload_estimate:
        report = offload_report(released_roles(DTYPES[args.offload_estimate]))
        print_offload(report)
        print(json.dumps(report))
        return
    chosen = {"all": set(ROLES), "none": set()}.get(args.teachers)
    if chosen is None:
        chosen = set(args.teachers.split(","))
        if not chosen <= set(ROLES):
            p.error(f"--teachers: {sorted(chosen - set(ROLES))} not among {ROLES}")
    off = [f"teachers.{r}.enabled=false" for r in ROLES if r not in chosen]
    if not chosen:  # the config check wants a role; the stand-in replaces it below
        off.remove("teachers.sd.enabled=false")
    cfg = full_config(
        args.config or ["configs/sd21.yaml"], ["train.precision=fp32", *off, *args.overrides]
    )
    print(f"# precision {cfg.train.precision}, teachers {sorted(chosen) or 'stand-in'}, "
          f"batch {cfg.train.batch_size}, 1 progressive step, CPU")  # fmt: skip
    log = PhaseLog()
    if not chosen:
        cfg.teachers.sd.enabled = False
    model, teachers, opt, _ = build(cfg, log)
    models = model_report(model, teachers)
    offload = offload_report(teachers)
    print_offload(offload)
    if not chosen:
        teachers = [StandIn()]
    for name, m in models.items():
        kinds = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in m["by_dtype"].items())
        print(f"  {name:52s} {m['parameters'] / 1e6:8.1f}M  {m['bytes'] / GIB:6.2f} GiB  ({kinds})")
    one_step(cfg, model, teachers, opt, log, early_teacher_grads=not args.late_teacher_grads)
    report = {
        "config": args.config or ["configs/sd21.yaml"],
        "overrides": args.overrides,
        "early_teacher_grads": not args.late_teacher_grads,
        "teachers": sorted(chosen) or "stand-in",
        "precision": cfg.train.precision,
        "models": models,
        "offload": dict(offload, enabled=cfg.teachers.offload),
        "weights_gib": round(sum(m["bytes"] for m in models.values()) / GIB, 3),
        "phases": log.rows,
        "peak_rss_gib": max(r["peak_rss_gib"] for r in log.rows),
    }
    print(json.dumps({k: report[k] for k in ("weights_gib", "peak_rss_gib")}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
