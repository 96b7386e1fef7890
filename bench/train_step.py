"""Time breakdown of one training step's phases at a config's real shapes.

    python -m bench.train_step --config configs/sd21.yaml [--k 0] [key=value ...]
    python -m bench.train_step --config configs/oracle.yaml

One progressive step k of training step --step (``bench.full_size.one_step``: text,
student UNet, VAE decode, volume branch, mesh branch, each teacher on each branch,
backward, optimizer), one torch thread unless --threads. A config whose teachers are
pretrained is built in code with random weights (``bench.full_size``); oracle teachers
are built as training builds them. The K progressive steps of a training step cost about
K x one (each frees its graph before the next; only the timestep differs), which the
summary prints as an estimate. "renderers + isosurface" = the volume and mesh branches'
forward passes (their backward is inside "backward"), as a share of the step.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.full_size import PhaseLog, build, full_config, model_report, one_step


def summary(rows: list[dict], k_steps: int) -> dict:
    build = {r["phase"]: r["seconds"] for r in rows if r["phase"].startswith("build")}
    step = {r["phase"]: r["seconds"] for r in rows if not r["phase"].startswith("build")}
    total = sum(step.values())
    render = sum(v for k, v in step.items() if k in ("volume_branch", "mesh_branch"))
    teachers = sum(v for k, v in step.items() if k.startswith("teacher_"))
    return {
        "build_seconds": build,
        "step_seconds": step,
        "one_progressive_step_seconds": round(total, 2),
        "training_step_estimate_seconds": round(total * k_steps, 1),
        "renderers_isosurface_share": round(render / total, 4),
        "teachers_forward_share": round(teachers / total, 4),
        "backward_share": round(step.get("backward", 0.0) / total, 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--k", type=int, default=0, help="0-based progressive step (its timestep)")
    p.add_argument("--step", type=int, default=0, help="training step of the ramps' weights")
    p.add_argument("--json", help="also write the rows and summary to this file")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = full_config(args.config or ["configs/oracle.yaml"], args.overrides)
    print(f"# {args.config}: precision {cfg.train.precision}, batch {cfg.train.batch_size}, "
          f"{args.threads} thread(s), CPU")  # fmt: skip
    log = PhaseLog()
    model, teachers, opt, _ = build(cfg, log)
    losses = one_step(cfg, model, teachers, opt, log, k=args.k, step=args.step)
    out = summary(log.rows, cfg.train.progressive_steps)
    print(json.dumps(out, indent=1))
    if args.json:
        report = {"rows": log.rows, "summary": out, "losses": losses}
        report["models"] = model_report(model, teachers)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
