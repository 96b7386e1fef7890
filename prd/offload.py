"""CPU offload of idle teachers (``teachers.offload``; docs/full_size.md).

On a GPU the pretrained teachers' frozen weights (MVDream's UNet, ND-MV's UNet and CLIP
text encoder, a separately loaded SD teacher) sit in device memory for the whole run,
although each one computes for a few calls a progressive step. With the lever on, a
role's own weights live in host memory and are copied to the run's device right before
its first call of a progressive step; after its last call's gradient they are dropped
from the device again (``prd.branches.score_branches`` runs the calls teacher by
teacher).

What moves (``plan``): every parameter and buffer of a role's ``weights`` (its denoiser,
a latent teacher's VAE), except those of a role that stays on the device
(``RoleTeachers.keep_resident``: the SD teacher on the student's base folder runs the
student's own frozen UNet and text encoder, which the student needs anyway). The SD VAE
that MVDream shares with that SD teacher therefore stays on the device; shared with an
SD teacher that is offloaded too, it moves in with each of the two (one holds it at a
time, never both: the loop calls them one after the other).

The weights are frozen, so the host copy stays valid: moving a role back to the host
only drops the device copy (no device-to-host copy); moving it in is one host-to-device
copy per tensor, from pinned memory and non-blocking when CUDA is available.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from prd.teacher_setup import RoleTeachers

PCIE4_X16_BYTES_PER_S = 25e9
"""Host-to-device rate of PCIe 4.0 x16 in practice (~25 GB/s of its 31.5 GB/s peak)."""


def _tensors(modules: Iterable[nn.Module]) -> Iterator[Tensor]:
    """Every parameter and buffer of ``modules``, each once."""
    seen = set()
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                yield t


class HostCopy:
    """One role's offloaded tensors: their host copies, and whether the role is resident.

    tensors: the role's parameters and buffers to move (frozen); hosts: host copies made
    by other roles' ``HostCopy`` so far, by ``id`` of the tensor (read and filled: a
    tensor two roles move has one host copy). On creation the tensors are moved to the
    host (the role starts idle)."""

    def __init__(
        self, name: str, tensors: list[Tensor], device, hosts: dict[int, Tensor] | None = None
    ):
        self.name = name
        self.device = torch.device(device)
        # page-locked host memory lets the copy to a CUDA device run asynchronously
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        hosts = {} if hosts is None else hosts
        self.slots: list[tuple[Tensor, Tensor]] = []
        for t in tensors:
            if t.requires_grad:
                raise ValueError(
                    f"teacher {name!r}: a trainable tensor {tuple(t.shape)} cannot be offloaded "
                    "(teachers are frozen)"
                )
            host = hosts.get(id(t))
            if host is None:
                host = t.detach().to("cpu")
                if pin:
                    host = host.pin_memory()
                hosts[id(t)] = host
            self.slots.append((t, host))
        self.resident = True
        self.to_host()

    @property
    def nbytes(self) -> int:
        """Bytes moved to the device each time (the tensors at their stored dtype)."""
        return sum(h.numel() * h.element_size() for _, h in self.slots)

    def to_device(self) -> None:
        """Copy every tensor to the run's device (non-blocking from pinned memory)."""
        for t, host in self.slots:
            t.data = host.to(self.device, non_blocking=host.is_pinned())
        self.resident = True

    def to_host(self) -> None:
        """Point every tensor back at its host copy, releasing the device copy."""
        for t, host in self.slots:
            t.data = host
        self.resident = False


def _resident_ids(roles: list[RoleTeachers]) -> set[int]:
    """``id`` of every tensor of the roles that stay on the device."""
    return {id(t) for r in roles if r.keep_resident for t in _tensors(r.weights)}


def plan(roles: list[RoleTeachers]) -> dict[str, list[Tensor]]:
    """role name -> the tensors offloading moves for it (module docstring): its weights'
    parameters and buffers minus those of any role that stays on the device; roles that
    stay, or have no weights (oracles), are left out."""
    kept = _resident_ids(roles)
    return {
        r.name: [t for t in _tensors(r.weights) if id(t) not in kept]
        for r in roles
        if r.weights and not r.keep_resident
    }


def attach(roles: list[RoleTeachers], device) -> None:
    """Give each role of ``plan(roles)`` that has none a ``HostCopy`` (``role.host``),
    moving its tensors to the host now. Called after each role is built, so at most one
    freshly loaded teacher's weights share the device with the student at build time.
    ValueError if a role that stays on the device uses a tensor already offloaded (a role
    keeping residence must be built before the roles it shares with)."""
    hosts = {id(t): h for r in roles if r.host is not None for t, h in r.host.slots}
    if _resident_ids(roles) & hosts.keys():
        raise ValueError(
            "teachers.offload: a teacher that stays on the device shares weights with one "
            "already offloaded; build it first"
        )
    for name, tensors in plan(roles).items():
        role = next(r for r in roles if r.name == name)
        if role.host is None and tensors:
            role.host = HostCopy(name, tensors, device, hosts)


def offloaded_bytes(roles: list[RoleTeachers]) -> dict[str, int]:
    """What the lever keeps off the device and moves, from ``plan`` (no tensor moved):
    "kept_off" the bytes of the distinct offloaded tensors, "moved_per_step" the bytes
    copied to the device per progressive step (each role's, once; a tensor two roles
    move counts twice)."""
    planned = plan(roles)
    distinct = {id(t): t for ts in planned.values() for t in ts}
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    return {
        "kept_off": nbytes(distinct.values()),
        "moved_per_step": sum(nbytes(ts) for ts in planned.values()),
    }
