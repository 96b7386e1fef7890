"""One optimizer step of the PRD model under DeepSpeed with per-sample inputs that do not
depend on the layout, for the data-parallel equivalence test (not a test module itself).

    torchrun --nproc_per_node 2 tests/equivalence_probe.py OUT.pt BATCH_PER_RANK

Rank r of W holds global samples r*b .. r*b + b - 1 of the 2b-sample batch (its own
noise, timesteps, prompts, field points, all seeded by the sample's index); its loss is
the mean over its batch, as every loss of the training loop is. The step runs K
progressive micro-steps with ``prd.train``'s DeepSpeed settings, optimizer and
``reaching_every_parameter``; rank 0 saves every parameter's fp32 weight and AdamW moments
(``prd.reshard.consolidate``) to OUT.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "a blue sphere", "a green torus", "a yellow cone"]


def one_update(batch: int, out: Path) -> None:
    from prd import distributed, reshard
    from prd.config import load
    from prd.model import build_model
    from prd.train import make_engine, reaching_every_parameter

    cfg = load(
        [REPO / "configs" / "tiny.yaml"],
        ["train.optimizer=adamw", "train.progressive_steps=2", f"train.batch_size={batch}"],
    )
    info = distributed.setup("cpu")
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # adapters away from their zero init, the same on every rank
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    engine, trainable = make_engine(cfg, model, info.world_size)
    planes, size = cfg.student.planes, cfg.student.resolved_latent_size()
    first = info.rank * batch
    for k in range(cfg.train.progressive_steps):
        losses = []
        for i in range(first, first + batch):
            g = torch.Generator().manual_seed(1000 * k + i)
            z = torch.randn(planes, 4, size, size, generator=g)
            t = torch.full((planes,), int(torch.randint(0, 1000, (1,), generator=g)))
            text = model.student.encode_text([PROMPTS[i % len(PROMPTS)]])
            x0, geometry, texture = engine(z, t, text)
            field = model.field(geometry, texture)
            pts = torch.rand(1, 64, 3, generator=g) - 0.5
            target = torch.randn(x0.shape, generator=g)
            losses.append(
                (x0 - target).square().mean()
                + field.sdf(pts).square().mean()
                + field.color(pts).mean()
            )
        loss = torch.stack(losses).mean()
        engine.backward(reaching_every_parameter(loss, trainable))
        engine.step()
    assert engine.was_step_applied()
    state = reshard.consolidate(engine)
    if info.is_main:
        torch.save(state["params"], out)


if __name__ == "__main__":
    one_update(int(sys.argv[2]), Path(sys.argv[1]))
