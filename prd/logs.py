"""Console progress and TensorBoard logs of a training run (rank 0 writes; others no-op)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm


class RunLogger:
    """Scalars per teacher / branch / progressive step, grad norm, lr, steps/s; image grids."""

    def __init__(self, run_dir: Path, active: bool, start: int, total: int, log_every: int = 1):
        self.active = active
        self.log_every = log_every
        self.writer = None
        self.bar = None
        if active:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start + 1)
            self.bar = tqdm(total=total, initial=start, desc="prd train", unit="step")

    def log_step(self, step: int, losses: dict[str, float], **scalars) -> None:
        if not self.active:
            return
        if step % self.log_every == 0:
            for name, value in losses.items():
                self.writer.add_scalar(f"loss/{name}", value, step)
            for name, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(f"train/{name}", float(value), step)
            if scalars.get("seconds"):
                self.writer.add_scalar("train/steps_per_s", 1.0 / scalars["seconds"], step)
        total = sum(v for k, v in losses.items() if k.startswith("total/"))
        self.bar.set_postfix(loss=f"{total:.4g}", refresh=False)
        self.bar.update(1)

    def log_images(self, step: int, images: dict) -> None:
        """One grid per (branch, teacher): rows are progressive steps k; columns the first
        object's views as RGB, normal, depth, then the teacher's x0 estimates."""
        if not self.active:
            return
        groups: dict[tuple[str, str], list] = {}
        for (branch, _k, teacher), (views, target) in sorted(images.items(), key=lambda i: i[0]):
            groups.setdefault((branch, teacher), []).append(render_row(views, target))
        for (branch, teacher), rows in groups.items():
            width = max(r.shape[1] for r in rows)
            rows = [torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) for r in rows]
            grid = torch.cat(rows, dim=0).clamp(0, 1)
            self.writer.add_image(f"renders/{branch}/{teacher}", grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.writer.close()


def _to_size(img: torch.Tensor, size: int) -> torch.Tensor:
    """(n, h, w, C) -> (n, size, size, 3) for display."""
    x = img.detach().float().cpu()
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    elif x.shape[-1] > 3:
        x = x[..., :3]
    x = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), size=(size, size), mode="nearest")
    return x.permute(0, 2, 3, 1)


def render_row(views, target: torch.Tensor, size: int = 64) -> torch.Tensor:
    """(size, W, 3) strip: object 0's views (rgb | normal | depth) then the teacher's x0."""
    v = views.views_per_object
    rgb = _to_size(views.rgb[:v], size)
    normal = _to_size(views.normal[:v] * 0.5 + 0.5, size)
    depth = views.depth[:v] * views.mask[:v]
    depth = depth / depth.amax().clamp_min(1e-6)
    depth = _to_size(depth[..., None], size)
    n_target = max(1, target.shape[0] * v // max(views.rgb.shape[0], 1))
    tgt = _to_size(target[:n_target], size)
    tiles = [*rgb, *normal, *depth, *tgt]
    return torch.cat(tiles, dim=1)
