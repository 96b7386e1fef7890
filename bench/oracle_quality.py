"""Oracle quality benchmark: train (or load) a run, sample every training and held-out
prompt, and print Chamfer distance, colour error and silhouette IoU per prompt.

    python -m bench.oracle_quality --run runs/oracle              # evaluate a trained run
    python -m bench.oracle_quality --run runs/bench --train       # train it first
    python -m bench.oracle_quality --run runs/oracle --json out.json

Targets of the embedded default (training prompts): Chamfer <= 0.03, colour error <= 0.1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prd.config import Config, load
from prd.configio import load_config_text
from prd.model import build_model
from prd.oracle_eval import mesh_quality
from prd.sample import EmptySurface, Timer, generate
from prd.weights import load_weights, read_config_yaml
from teachers.scenes import HELDOUT_PROMPTS, TRAIN_PROMPTS


def evaluate_run(
    run: Path, seed: int = 0, grid: int | None = None, only: set[str] | None = None
) -> list[dict]:
    """Rows of every vocabulary prompt (``only``: of those prompts alone)."""
    weights = run / "export" / "latest.safetensors"
    overrides = [] if grid is None else [f"sample.grid={grid}"]
    cfg = load_config_text(Config, read_config_yaml(weights), overrides)
    model = build_model(cfg, seed=cfg.train.seed).eval()
    load_weights(model, weights)
    rows = []
    for split, prompts in (("train", TRAIN_PROMPTS), ("heldout", HELDOUT_PROMPTS)):
        for prompt in prompts:
            if only is not None and prompt not in only:
                continue
            timer = Timer()
            try:
                s = generate(model, prompt, cfg.sample, seed, timer)
            except EmptySurface:
                rows.append({"prompt": prompt, "split": split, "empty": True})
                continue
            q = mesh_quality(prompt, s.verts, s.faces, s.colors).as_dict()
            q.update(split=split, sample_seconds=round(sum(timer.stages.values()), 3))
            rows.append(q)
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {}
    for split in ("train", "heldout"):
        ok = [r for r in rows if r["split"] == split and not r.get("empty")]
        n_all = sum(r["split"] == split for r in rows)
        if not ok:
            out[split] = {"n": n_all, "empty": n_all}
            continue

        def mean(key: str, rows=ok) -> float:
            return sum(r[key] for r in rows) / len(rows)

        out[split] = {
            "n": n_all,
            "empty": n_all - len(ok),
            "chamfer": round(mean("chamfer"), 4),
            "color_error": round(mean("color_error"), 4),
            "silhouette_iou": round(mean("silhouette_iou"), 4),
            "chamfer_max": round(max(r["chamfer"] for r in ok), 4),
            "color_error_max": round(max(r["color_error"] for r in ok), 4),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--train", action="store_true", help="train configs/oracle.yaml first")
    p.add_argument("--grid", type=int, default=None, help="marching-cubes grid for sampling")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument(
        "--prompts-file", type=Path, default=None, help="score only these vocabulary prompts"
    )
    p.add_argument("overrides", nargs="*", help="training config overrides")
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if args.train:
        from prd.train import train

        train(load(["configs/oracle.yaml"], args.overrides), args.run)
    t_train = time.perf_counter() - t0
    only = None
    if args.prompts_file:
        only = {x.strip() for x in args.prompts_file.read_text().splitlines() if x.strip()}
        unknown = sorted(only - set(TRAIN_PROMPTS) - set(HELDOUT_PROMPTS))
        if unknown:
            raise SystemExit(f"{args.prompts_file}: not vocabulary prompts: {unknown}")
    rows = evaluate_run(args.run, grid=args.grid, only=only)
    for r in rows:
        if r.get("empty"):
            print(f"{r['split']:8s} {r['prompt']:20s} EMPTY SURFACE")
        else:
            print(
                f"{r['split']:8s} {r['prompt']:20s} chamfer {r['chamfer']:.4f}  "
                f"colour {r['color_error']:.4f}  IoU {r['silhouette_iou']:.3f}"
            )
    summary = summarize(rows)
    summary["train_seconds"] = round(t_train, 1)
    summary["eval_seconds"] = round(time.perf_counter() - t0 - t_train, 1)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
