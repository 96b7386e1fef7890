"""Cost of a checkpoint's world-size-independent copy (``prd.reshard.consolidate``)
beside DeepSpeed's own save, for a preset's trainable parameters.

    python -m bench.checkpoint [--config configs/oracle.yaml] [--repeats 5] [key=value ...]

Builds the model and DeepSpeed engine as ``prd train`` does (this process is rank 0 of 1,
or run it under torchrun for more ranks), takes one optimizer step on a stand-in loss so
the optimizer state exists, then times, best of --repeats: DeepSpeed's save_checkpoint,
consolidate() (gathering every trainable tensor's fp32 weight and optimizer moments), and
writing its result; and prints the bytes of each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from prd import distributed, reshard
from prd.config import load
from prd.model import build_model
from prd.train import make_engine


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        distributed.barrier()
        t0 = time.perf_counter()
        fn()
        distributed.barrier()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load(args.config or ["configs/oracle.yaml"], ["student.pretrained=null", *args.overrides])
    torch.set_num_threads(1)
    info = distributed.setup(cfg.train.device)
    model = build_model(cfg, device=info.device, seed=0)
    engine, trainable = make_engine(cfg, model, info.world_size)
    for _ in range(cfg.train.progressive_steps * cfg.train.grad_accum):
        engine.backward(sum(q.square().sum() for q in trainable))
        engine.step()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ds = best(
            lambda: engine.save_checkpoint(tmp, tag="t", exclude_frozen_parameters=True),
            args.repeats,
        )
        gathered = {}
        cons = best(lambda: gathered.update(state=reshard.consolidate(engine)), args.repeats)
        path = folder / "t" / reshard.CONSOLIDATED
        write = best(lambda: torch.save(gathered["state"], path), args.repeats)
        ds_bytes = sum(f.stat().st_size for f in (folder / "t").iterdir() if f != path)
        if info.is_main:
            row = {
                "ranks": info.world_size,
                "trainable_values": sum(q.numel() for q in trainable),
                "deepspeed_save_s": round(ds, 4),
                "consolidate_s": round(cons, 4),
                "consolidated_write_s": round(write, 4),
                "deepspeed_bytes": ds_bytes,
                "consolidated_bytes": path.stat().st_size,
            }
            print(json.dumps(row))


if __name__ == "__main__":
    main()
