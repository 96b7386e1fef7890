"""Two memory levers of the paper's configuration measured at the real shapes with random
weights, each setting in a fresh process of its own (a process's peak RSS is its own):

- decode: ``student.decode_chunk`` 0 (all 12 planes in one decoder pass, its up-blocks
  checkpointed) vs 1 (every plane's whole decode one checkpointed segment). The SD 2.1
  student's VAE decoder with PETA and the new conv_out (``bench.full_size.build``) turns
  batch 2 x 6 plane latents (32 x 32) into 256 px triplanes; forward and backward of a
  fixed random projection of both triplanes.
- mesh: ``mesh.view_chunk`` 0 (the raster graph of all views) vs 1 (one view per object
  per checkpointed segment). ``prd.branches.mesh_branch`` on a random-weight field of the
  real triplane shapes (2 objects x 3 x 32 x 256^2, field MLPs and learned background as
  built for training): 128^3 grid, torch rasterizer at 512 px, 2 x 4 views sampled as
  training samples them; forward and backward of a fixed random projection of the renders.

    python -m bench.levers [--only decode|mesh] [--threads N] [--json FILE]
        [--precision fp32|bf16] [--max-rss-gib 12] [--min-available-gib 3] [key=value ...]

Every child runs with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc returns freed large blocks,
so the RSS after building is what lives on). After building, the child resets its peak
RSS to its current RSS (``/proc/self/clear_refs``), so the peak it reports (``ru_maxrss``,
and the kernel's ``VmHWM``) is the lever's, not the build's. The parent samples each
child's RSS (its "sampled" maximum covers the whole child, the build included) and the
machine's MemAvailable, and kills the child past either limit. The gradient norms of each
pair must agree to float rounding: the chunks change memory only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.full_size import build, full_config
from bench.rss import peak_rss_gib, rss_gib
from prd import precision
from prd.arch import ARCH_CONFIGS
from prd.background import LearnedBackground
from prd.branches import mesh_branch
from prd.config import Config
from prd.teacher_setup import ROLES
from prd.triplane import FieldDecoder
from renderers.cameras import sample_cameras

LEVERS = {"decode": "student.decode_chunk", "mesh": "mesh.view_chunk"}
SETTINGS = (0, 1)
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
RENDERS = ("rgb", "mask", "depth", "normal")


def lever_config(
    lever: str, setting: int, files: list[str], overrides: list[str], precision_name: str = "fp32"
) -> Config:
    """The config of ``files`` (random-weight student) with ``lever``'s key at ``setting``,
    ``train.precision`` and ``overrides``; no teacher is built (they are off both paths)."""
    if lever not in LEVERS:
        raise ValueError(f"lever must be one of {sorted(LEVERS)}, got {lever!r}")
    sets = [f"train.precision={precision_name}", f"{LEVERS[lever]}={setting}", *overrides]
    cfg = full_config(files, sets)
    for role in ROLES:  # after the config's check, which wants one role enabled
        getattr(cfg.teachers, role).enabled = False
    return cfg


def _plane_size(cfg: Config) -> int:
    """Pixels per side of the decoded triplanes: the latent size times the student VAE's
    upsampling (2 per block after the first)."""
    vae = ARCH_CONFIGS[cfg.student.arch][1]
    return cfg.student.resolved_latent_size() * 2 ** (len(vae["block_out_channels"]) - 1)


def _projection(shape, gen: torch.Generator) -> torch.Tensor:
    """A fixed random direction: the scalar backpropagated is <output, projection>."""
    return torch.randn(shape, generator=gen) / (torch.Size(shape).numel() ** 0.5)


def _norms(named: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """The 2-norm of the gradients of each named group of tensors (float64)."""
    out = {}
    for name, tensors in named.items():
        grads = [t.grad.double() for t in tensors if t.grad is not None]
        out[name] = torch.stack([g.norm() for g in grads]).norm().item() if grads else 0.0
    return out


def build_decode(cfg: Config, seed: int = 0) -> Callable[[], dict]:
    """The student's decode path of ``cfg`` (``bench.full_size.build``; its UNet and text
    encoder, off the path, are dropped) and its input latents; returns ``run()`` for one
    forward and backward, which returns the seconds and the gradient norms."""
    model, _, _, _ = build(cfg, on_phase=lambda name: None, seed=seed)
    student = model.student
    student.unet = student.text_encoder = None
    gen = torch.Generator().manual_seed(seed + 1)
    b, p, c = cfg.train.batch_size, cfg.student.planes, cfg.student.triplane_channels
    size, side = cfg.student.resolved_latent_size(), _plane_size(cfg)
    x0 = torch.randn(b * p, 4, size, size, generator=gen).requires_grad_(True)
    proj = [_projection((b, 3, c, side, side), gen) for _ in range(2)]
    trainable = [q for q in student.decoder.parameters() if q.requires_grad]
    conv_out = list(student.decoder.conv_out.parameters())
    adapters = [q for q in trainable if all(q is not o for o in conv_out)]

    def run() -> dict:
        t0 = time.perf_counter()
        with precision.autocast(cfg.train.precision, "cpu"):
            geometry, texture = student.decode(x0)
        value = sum((t.float() * w).sum() for t, w in zip((geometry, texture), proj, strict=True))
        t1 = time.perf_counter()
        value.backward()
        t2 = time.perf_counter()
        norms = _norms({"x0": [x0], "conv_out": conv_out, "vae_adapters": adapters})
        return {"forward_s": t1 - t0, "backward_s": t2 - t1, "value": value.item(),
                "grad_norms": norms}  # fmt: skip

    return run


def build_mesh(cfg: Config, seed: int = 0) -> Callable[[], dict]:
    """The field MLPs and learned background of ``cfg`` (random weights, fp32 as trained),
    random triplanes of the student's shapes, the pooled prompt embeddings the background
    takes and the training cameras; returns ``run()`` for one forward and backward of the
    mesh branch, which returns the seconds, the covered share of pixels and the gradient
    norms."""
    text = ARCH_CONFIGS[cfg.student.arch][2]
    b, c, size = cfg.train.batch_size, cfg.student.triplane_channels, _plane_size(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        decoder = FieldDecoder(cfg.field)
        background = LearnedBackground(cfg.background, text["hidden_size"])
    gen = torch.Generator().manual_seed(seed + 1)
    # unit-variance features: the sphere prior plus a random MLP's bumps, one closed surface
    planes = [torch.randn(b, 3, c, size, size, generator=gen).requires_grad_(True)
              for _ in range(2)]  # fmt: skip
    pooled = torch.randn(b, text["hidden_size"], generator=gen)
    cams = sample_cameras(b, cfg.cameras, gen)
    n, res = len(cams), cfg.mesh.resolution
    proj = {k: _projection((n, res, res, *((3,) if k in ("rgb", "normal") else ())), gen)
            for k in RENDERS}  # fmt: skip

    def run() -> dict:
        t0 = time.perf_counter()
        field = decoder.bind(*planes)
        out = mesh_branch(field, cams, cfg.mesh, cfg.mesh_grid, background.bind(pooled))
        views = out.views
        value = sum((getattr(views, k) * proj[k]).sum() for k in RENDERS)
        t1 = time.perf_counter()
        value.backward()
        t2 = time.perf_counter()
        norms = _norms({
            "geometry": planes[:1], "texture": planes[1:],
            "sdf_mlp": list(decoder.sdf_mlp.parameters()),
            "deform_mlp": list(decoder.deform_mlp.parameters()),
            "color_mlp": list(decoder.color_mlp.parameters()),
            "background": list(background.parameters()),
        })  # fmt: skip
        return {"forward_s": t1 - t0, "backward_s": t2 - t1, "value": value.item(),
                "covered": views.mask.mean().item(), "grad_norms": norms}  # fmt: skip

    return run


BUILDERS = {"decode": build_decode, "mesh": build_mesh}


def _peaks() -> dict[str, float]:
    """This process's peak RSS (GiB): ``ru_maxrss`` and the kernel's ``VmHWM``."""
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {
        "peak_rss_gib": peak_rss_gib(),
        "vm_hwm_gib": hwm / 2**20,
    }


def _reset_peak() -> None:
    """Set this process's peak RSS to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(lever: str, cfg: Config, seed: int = 0) -> dict:
    """Build ``lever``'s part, reset the peak, run it once: RSS, peaks and seconds."""
    t0 = time.perf_counter()
    run = BUILDERS[lever](cfg, seed)
    built = {"build_s": time.perf_counter() - t0, "build_peak_rss_gib": _peaks()["peak_rss_gib"]}
    _reset_peak()
    # read after the reset: the peak starts from about this RSS (read before, memory
    # freed in between would leave the new peak well under it); the kernel raises its
    # high-water mark lazily, so pages returned later with madvise can leave the peak a
    # few pages under it (a transient of a few KiB below zero means none)
    built["rss_built_gib"] = rss_gib()
    t1 = time.perf_counter()
    out = run()
    out["wall_s"] = time.perf_counter() - t1
    out.update(built, **_peaks())
    out["transient_gib"] = out["peak_rss_gib"] - out["rss_built_gib"]
    return out


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("MemAvailable:")) / 2**20


def _rss_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(x.split()[1]) for x in f if x.startswith("VmRSS:")), 0) / 2**20
    except FileNotFoundError:  # the child has just exited
        return 0.0


def run_child(args, lever: str, setting: int) -> dict:
    """One setting in a fresh process, watched: killed past ``--max-rss-gib`` or when the
    machine's MemAvailable falls under ``--min-available-gib``."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.levers", "--child", f"{lever}={setting}",
               "--child-out", str(result), "--threads", str(args.threads),
               "--precision", args.precision, *sum((["--config", c] for c in args.config), []),
               *args.overrides]  # fmt: skip
        child = subprocess.Popen(cmd, env={**os.environ, **CHILD_ENV})
        sampled, abort = 0.0, None
        while child.poll() is None:
            rss, free = _rss_of(child.pid), _available_gib()
            sampled = max(sampled, rss)
            if rss > args.max_rss_gib:
                abort = f"child RSS {rss:.2f} GiB over --max-rss-gib {args.max_rss_gib}"
            elif free < args.min_available_gib:
                abort = f"MemAvailable {free:.2f} GiB under --min-available-gib"
            if abort:
                child.kill()
                child.wait()
                break
            time.sleep(0.2)
        out = {"lever": lever, "key": LEVERS[lever], "setting": setting}
        if abort or child.returncode != 0:
            return {**out, "error": abort or f"child exited with {child.returncode}",
                    "sampled_max_rss_gib": sampled}  # fmt: skip
        return {**out, **json.loads(result.read_text()), "sampled_max_rss_gib": sampled}


def report(rows: list[dict]) -> list[str]:
    """The table of the measured rows and, per lever, the gradient norms of both settings
    with their largest relative difference."""
    lines = [f"{'lever':22s} {'set':>3s} {'built':>6s} {'peak':>6s} {'VmHWM':>6s} "
             f"{'sampled':>7s} {'transient':>9s} {'fwd s':>7s} {'bwd s':>7s}"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"{r['key']:22s} {r['setting']:3d}  stopped: {r['error']}")
            continue
        lines.append(
            f"{r['key']:22s} {r['setting']:3d} {r['rss_built_gib']:6.2f} {r['peak_rss_gib']:6.2f} "
            f"{r['vm_hwm_gib']:6.2f} {r['sampled_max_rss_gib']:7.2f} {r['transient_gib']:9.2f} "
            f"{r['forward_s']:7.1f} {r['backward_s']:7.1f}"
        )
    for lever in LEVERS:
        done = [r for r in rows if r["lever"] == lever and "error" not in r]
        if len(done) < 2:
            continue
        lines.append(f"{lever}: gradient norms at {LEVERS[lever]} = "
                     + " / ".join(str(r["setting"]) for r in done))  # fmt: skip
        for name in done[0]["grad_norms"]:
            vals = [r["grad_norms"][name] for r in done]
            rel = (max(vals) - min(vals)) / max(abs(max(vals)), 1e-300)
            lines.append(f"  {name:14s} " + " ".join(f"{v:.9e}" for v in vals)
                         + f"   rel diff {rel:.1e}")  # fmt: skip
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--only", choices=sorted(LEVERS), help="measure one lever (default both)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--precision",
        choices=precision.PRECISIONS,
        default="fp32",
        help="train.precision: bf16 stores and runs the frozen decoder in bf16",
    )
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--max-rss-gib", type=float, default=12.0)
    p.add_argument("--min-available-gib", type=float, default=3.0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    files = args.config or ["configs/sd21.yaml"]
    if args.child:
        torch.set_num_threads(args.threads)
        lever, setting = args.child.split("=")
        cfg = lever_config(lever, int(setting), files, args.overrides, args.precision)
        Path(args.child_out).write_text(json.dumps(measure(lever, cfg)))
        return
    try:  # bad keys or values fail here, not in a child
        for lever in LEVERS:
            lever_config(lever, 0, files, args.overrides, args.precision)
    except (ValueError, KeyError, FileNotFoundError) as e:
        p.error(str(e))
    rows = []
    for lever in [args.only] if args.only else list(LEVERS):
        for setting in SETTINGS:
            print(f"# {LEVERS[lever]}={setting} ({args.precision}) ...", flush=True)
            rows.append(run_child(args, lever, setting))
            print("\n".join(report(rows[-1:])[1:]), flush=True)
    print("\n".join(report(rows)))
    if args.json:
        meta = {"config": files, "overrides": args.overrides, "precision": args.precision,
                "threads": args.threads}  # fmt: skip
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
