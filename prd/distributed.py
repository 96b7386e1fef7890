"""Process setup for DeepSpeed: accelerator, backend, rank, device.

One process by default (no launcher needed); ``torchrun`` or ``deepspeed`` launchers set
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for more. On machines without
CUDA, DeepSpeed's CPU accelerator is selected (``DS_ACCELERATOR=cpu`` must be set before
deepspeed is imported) and the gloo backend carries the collectives.

On CPU, DeepSpeed would also JIT-compile its shared-memory all-reduce op when its comm
backend starts (measured: 52 s on the first launch of a 2-core machine, cached after). That
op serves only ``inference_all_reduce``; training collectives go through torch.distributed
(gloo) either way, so the op is marked unavailable and never built (``_skip_shm_comm``).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_shm_comm() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce op (module docstring).

    ``deepspeed.ops.__compatible_ops__`` is DeepSpeed's cached table of buildable ops, which
    its comm backend consults before building; an entry set to False is left unbuilt.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def setup(device: str = "auto", timeout: float = 1800.0) -> DistInfo:
    """Initialize torch.distributed through DeepSpeed; returns this process's place.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda". The caller's choice
    decides the accelerator; nothing here hard-codes a device index beyond LOCAL_RANK.
    timeout: seconds a collective waits for the other ranks before it raises (a rank that
    died without the launcher noticing then ends the run instead of hanging it). With
    NCCL it takes effect through TORCH_NCCL_ASYNC_ERROR_HANDLING (on by default).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no CUDA device")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # a plain single-process run
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if not use_cuda:
        _skip_shm_comm()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout)
        )
    rank = torch.distributed.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank, torch.distributed.get_world_size(), local_rank, dev)


def log_main(message: str) -> None:
    """Print a line on stderr from the main process only (RANK 0, or no launcher)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"prd: {message}", file=sys.stderr, flush=True)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
        x /= torch.distributed.get_world_size()
    return x
