"""Per-stage times of one ``prd sample`` call at batch 1 on this machine.

Stages (``prd.sample.generate`` + export): text encode, each UNet step (6 planes), VAE
decode (6 planes -> two triplanes), field grid evaluation (SDF + deformation), marching
cubes, vertex colours, GLB export. "network" = text encode + UNet steps + VAE decode;
"outside" = everything else, as a share of the total. Random weights built in code
(``student.pretrained`` is cleared): the shapes, hence the times, are those of the real
model. Each config is warmed up with one UNet pass before timing (the first pass pays
for one-off kernel setup).

    python -m bench.sample [--config configs/tiny.yaml configs/sd21.yaml]
                           [--grid 64 160] [--threads 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from prd.config import load
from prd.export import export_mesh
from prd.model import build_model
from prd.sample import EmptySurface, Timer, generate

NETWORK_STAGES = ("text_encode", "unet_step", "vae_decode")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_config(path: str, grids: list[int], repeats: int, prompt: str) -> list[dict]:
    cfg = load([path], ["student.pretrained=null", "student.allow_random_sd21=true"])
    t0 = time.perf_counter()
    model = build_model(cfg, seed=cfg.train.seed).eval()
    build_s = time.perf_counter() - t0
    print(f"# {path}: built in {build_s:.1f}s, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    student = model.student
    size, planes = student.cfg.resolved_latent_size(), student.cfg.planes
    with torch.no_grad():  # warm-up: one UNet pass at the sampling batch
        text = student.encode_text([prompt])
        z = torch.randn(planes, 4, size, size)
        student.predict_x0(z, torch.full((planes,), 999, dtype=torch.long), text)
    rows = []
    for grid in grids:
        sample_cfg = type(cfg.sample)(**{**vars(cfg.sample), "grid": grid})
        for rep in range(repeats):
            timer = Timer()
            try:
                sample = generate(model, prompt, sample_cfg, seed=rep, timer=timer)
            except EmptySurface as exc:
                print(f"# {path} grid {grid}: {exc}")
                continue
            with tempfile.TemporaryDirectory() as tmp, timer("export"):
                export_mesh(sample.verts, sample.faces, sample.colors, Path(tmp) / "m.glb")
            total = sum(timer.stages.values())
            network = sum(v for k, v in timer.stages.items() if k.startswith(NETWORK_STAGES))
            rows.append(
                {
                    "config": path,
                    "grid": grid,
                    "repeat": rep,
                    "faces": int(sample.faces.shape[0]),
                    "seconds": {k: round(v, 4) for k, v in timer.stages.items()},
                    "total_seconds": round(total, 3),
                    "outside_network_share": round(1 - network / total, 4),
                    "build_seconds": round(build_s, 2),
                    "peak_rss_gib": round(peak_rss_gib(), 2),
                }
            )
            print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    stages = "  ".join(f"{k} {v:.3f}" for k, v in row["seconds"].items())
    outside = 100 * row["outside_network_share"]
    print(
        f"{row['config']}  grid {row['grid']}  faces {row['faces']}  "
        f"total {row['total_seconds']:.2f}s  outside network {outside:.1f}%"
    )
    print(f"    {stages}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=["configs/tiny.yaml", "configs/sd21.yaml"])
    parser.add_argument("--grid", type=int, nargs="+", default=[64, 160])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads, fp32, CPU, batch 1")
    rows = []
    for path in args.config:
        rows += bench_config(path, args.grid, args.repeats, args.prompt)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
