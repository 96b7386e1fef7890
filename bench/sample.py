"""Per-stage times of ``prd sample`` on this machine, and one mesh's time on a GPU
estimated from each stage's counted FLOPs.

Stages (``prd.sample.generate_batch`` + export): text encode, each UNet step (6 planes
per prompt), VAE decode (6 planes -> two triplanes), field grid evaluation (SDF +
deformation), marching cubes, vertex colours, GLB export. "network" = text encode + UNet
steps + VAE decode; "outside" = everything else, as a share of the total. Random weights
built in code (``student.pretrained`` is cleared): the shapes, hence the times, are those
of the real model. Each config is warmed up with one UNet pass before timing (the first
pass pays for one-off kernel setup). Times per mesh = the batch's / --batch-size.

FLOPs: one more pass under ``torch.utils.flop_counter.FlopCounterMode`` per stage
(matmuls, convolutions, attention; elementwise ops and ``grid_sample`` are not counted).
GPU estimate per mesh: network stages and the grid's MLPs at --mfu of the chip's
published dense bf16 tensor throughput, plus the grid's plane reads at its memory
bandwidth. Marching cubes: with ``sample.isosurface: torch`` (the default) it runs on the
GPU, a chain of small memory-bound kernels: its estimate is the bytes its ops read and
write (counted per op here, views excluded) at the chip's bandwidth plus a launch
latency per op; with "skimage" it runs on the host, and its time measured here carries
over as it is. The export runs on the host (trimesh) and carries over likewise (a
pessimistic figure on a loaded CPU).
``--estimate FILE`` reprints the estimates from a --json file without running anything.

    python -m bench.sample [--config configs/tiny.yaml configs/sd21.yaml]
                           [--grid 64 160] [--batch-size 1] [--threads 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from bench.rss import peak_rss_gib
from prd.config import load
from prd.export import export_mesh
from prd.model import build_model
from prd.sample import EmptySurface, Timer, generate_batch

NETWORK_STAGES = ("text_encode", "unet_step", "vae_decode")
# trimesh's export, and scikit-image's marching cubes when chosen, run on the host CPU
# whatever the device (the grid is copied to the host for the latter)
HOST_STAGES = ("export",)
# time from one CUDA kernel's launch to the next's on a busy stream: a few microseconds
# (NVIDIA's CUDA best-practices guide); 10 us also covers the host syncs of nonzero/unique
LAUNCH_SECONDS = 10e-6
# published dense (no sparsity) bf16 tensor-core throughput and memory bandwidth:
# A100 SXM 80 GB: 312 TFLOP/s, 2.04 TB/s (NVIDIA A100 datasheet); H100 SXM: 989 TFLOP/s,
# 3.35 TB/s (NVIDIA H100 datasheet)
CHIPS = {"A100": (312e12, 2.04e12), "H100": (989e12, 3.35e12)}
# a second estimate at this share of peak: small-batch diffusion UNets in bf16 typically
# reach 30-50% of tensor-core peak; the lower end is taken
MFU_ASSUMED = 0.3


class TrafficCounter(TorchDispatchMode):
    """Counts the ops run and the bytes of their tensor inputs and outputs (views, which
    move nothing, excluded): an upper bound on a kernel chain's memory traffic."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.ops += 1
            for t in tree_flatten((args, kwargs, out))[0]:
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


class FlopTimer(Timer):
    """A Timer that also counts each stage's FLOPs (``flops[stage]``) and, for marching
    cubes, its ops and bytes (``traffic[stage]`` = (ops, bytes))."""

    def __init__(self):
        super().__init__()
        self.flops: dict[str, int] = {}
        self.traffic: dict[str, tuple[int, int]] = {}

    @contextmanager
    def __call__(self, name: str):
        traffic = TrafficCounter() if name == "marching_cubes" else nullcontext()
        with FlopCounterMode(display=False) as counter, traffic, super().__call__(name):
            yield
        self.flops[name] = self.flops.get(name, 0) + counter.get_total_flops()
        if isinstance(traffic, TrafficCounter):
            self.traffic[name] = (traffic.ops, traffic.bytes)


def gpu_estimate(row: dict, chip: str, mfu: float) -> dict:
    """Seconds per mesh on ``chip`` (module docstring): per stage and the total."""
    peak, bandwidth = CHIPS[chip]
    est = {}
    for stage, flops in row["flops_per_mesh"].items():
        if stage.startswith(HOST_STAGES):
            est[stage] = row["seconds"][stage]
        elif stage == "marching_cubes":
            if row.get("isosurface") == "torch":
                ops, moved = row["marching_cubes_traffic_per_mesh"]
                est[stage] = moved / bandwidth + ops * LAUNCH_SECONDS
            else:
                est[stage] = row["seconds"][stage]
        else:
            est[stage] = flops / (peak * mfu)
    est["grid_eval"] = est.get("grid_eval", 0.0) + row["grid_bytes_per_mesh"] / bandwidth
    est["export"] = row["seconds"]["export"]
    total = sum(est.values())
    return {
        "chip": chip,
        "mfu": mfu,
        "seconds": est,
        "total_seconds": total,
        "without_export_seconds": total - est["export"],
    }


def bench_config(path: str, grids: list[int], repeats: int, prompt: str, batch: int) -> list[dict]:
    cfg = load([path], ["student.pretrained=null", "student.allow_random_sd21=true"])
    t0 = time.perf_counter()
    model = build_model(cfg, seed=cfg.train.seed).eval()
    build_s = time.perf_counter() - t0
    print(f"# {path}: built in {build_s:.1f}s, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    student = model.student
    size, planes = student.cfg.resolved_latent_size(), student.cfg.planes
    prompts = [f"{prompt} {i}" if i else prompt for i in range(batch)]
    with torch.no_grad():  # warm-up: one UNet pass at the sampling batch
        text = student.encode_text(prompts)
        z = torch.randn(batch * planes, 4, size, size)
        student.predict_x0(z, torch.full((batch * planes,), 999, dtype=torch.long), text)
    rows = []
    for grid in grids:
        sample_cfg = type(cfg.sample)(**{**vars(cfg.sample), "grid": grid})
        for rep in range(repeats + 1):  # the last pass counts FLOPs (and is not timed)
            timer = FlopTimer() if rep == repeats else Timer()
            results = generate_batch(model, prompts, sample_cfg, seed=rep, timer=timer)
            empty = [r for r in results if isinstance(r, EmptySurface)]
            if empty:
                print(f"# {path} grid {grid}: {empty[0]}")
                continue
            with tempfile.TemporaryDirectory() as tmp, timer("export"):
                for i, sample in enumerate(results):
                    export_mesh(sample.verts, sample.faces, sample.colors, Path(tmp) / f"{i}.glb")
            if rep == repeats:
                for row in rows:
                    if row["grid"] == grid:
                        add_flops(row, timer, cfg, batch)
                continue
            per_mesh = {k: v / batch for k, v in timer.stages.items()}
            total = sum(per_mesh.values())
            network = sum(v for k, v in per_mesh.items() if k.startswith(NETWORK_STAGES))
            rows.append(
                {
                    "config": path,
                    "grid": grid,
                    "batch_size": batch,
                    "repeat": rep,
                    "faces": int(results[0].faces.shape[0]),
                    "isosurface": sample_cfg.isosurface,
                    "seconds": {k: round(v, 4) for k, v in per_mesh.items()},
                    "total_seconds": round(total, 3),
                    "outside_network_share": round(1 - network / total, 4),
                    "build_seconds": round(build_s, 2),
                    "peak_rss_gib": round(peak_rss_gib(), 2),
                }
            )
        for row in rows:
            if row["grid"] == grid:
                print_row(row)
    return rows


def add_flops(row: dict, timer: FlopTimer, cfg, batch: int) -> None:
    """FLOPs per mesh of each stage, the bytes the grid evaluation reads, GPU estimates."""
    row["flops_per_mesh"] = {k: v // batch for k, v in timer.flops.items()}
    ops, moved = timer.traffic["marching_cubes"]
    row["marching_cubes_traffic_per_mesh"] = [ops / batch, moved / batch]
    # every grid point reads 4 bilinear taps of C fp32 channels on each of 3 planes
    points, c = row["grid"] ** 3, cfg.student.triplane_channels
    row["grid_bytes_per_mesh"] = points * 3 * 4 * c * 4
    row["gpu_estimates"] = [
        gpu_estimate(row, chip, mfu) for chip in CHIPS for mfu in (1.0, MFU_ASSUMED)
    ]


def print_row(row: dict) -> None:
    stages = "  ".join(f"{k} {v:.3f}" for k, v in row["seconds"].items())
    outside = 100 * row["outside_network_share"]
    print(
        f"{row['config']}  grid {row['grid']}  batch {row['batch_size']}  faces {row['faces']}  "
        f"per mesh {row['total_seconds']:.2f}s  outside network {outside:.1f}%"
    )
    print(f"    seconds per mesh: {stages}")
    if "flops_per_mesh" in row:
        gflops = "  ".join(f"{k} {v / 1e9:.2f}" for k, v in row["flops_per_mesh"].items())
        print(f"    GFLOP per mesh: {gflops}")
        ops, moved = row["marching_cubes_traffic_per_mesh"]
        print(
            f"    marching cubes ({row['isosurface']}): {ops:.0f} ops, {moved / 1e6:.1f} MB moved"
        )
        for est in row["gpu_estimates"]:
            parts = "  ".join(f"{k} {1e3 * v:.1f}" for k, v in est["seconds"].items())
            print(
                f"    {est['chip']} at {100 * est['mfu']:.0f}% of bf16 peak: "
                f"{est['total_seconds']:.3f} s/mesh, {est['without_export_seconds']:.3f} "
                f"without export (ms: {parts})"
            )
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=["configs/tiny.yaml", "configs/sd21.yaml"])
    parser.add_argument("--grid", type=int, nargs="+", default=[64, 160])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per network pass")
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    parser.add_argument("--estimate", help="reprint the GPU estimates of this --json file")
    args = parser.parse_args()
    if args.estimate:
        for row in json.loads(Path(args.estimate).read_text()):
            if "flops_per_mesh" in row:
                row["gpu_estimates"] = [
                    gpu_estimate(row, chip, mfu) for chip in CHIPS for mfu in (1.0, MFU_ASSUMED)
                ]
                print_row(row)
        return
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads, fp32, CPU")
    rows = []
    for path in args.config:
        rows += bench_config(path, args.grid, args.repeats, args.prompt, args.batch_size)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
