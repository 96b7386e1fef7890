"""Raster backends: objects with nvdiffrast's three ops, ``rasterize``, ``interpolate`` and
``antialias``, and the same semantics (see ``renderers.raster``)."""

from __future__ import annotations

import importlib.util

import torch

from renderers.raster import torch_raster as _tr
from renderers.raster.antialias import antialias as _antialias


def nvdiffrast_available() -> bool:
    """True when ``nvdiffrast.torch`` can be imported (it needs CUDA to run)."""
    return importlib.util.find_spec("nvdiffrast") is not None


class TorchRaster:
    """The pure-torch backend: CPU and CUDA, any float dtype (the default)."""

    def __init__(self, chunk_pairs: int = _tr.DEFAULT_CHUNK_PAIRS):
        self.chunk_pairs = chunk_pairs
        """(triangle, pixel) pairs tested at once; bounds rasterization memory."""

    def rasterize(self, pos, tri, resolution):
        """See ``renderers.raster.torch_raster.rasterize``."""
        return _tr.rasterize(pos, tri, resolution, chunk_pairs=self.chunk_pairs)

    def interpolate(self, attr, rast, tri, rast_db=None, diff_attrs=None):
        """See ``renderers.raster.torch_raster.interpolate``."""
        return _tr.interpolate(attr, rast, tri, rast_db=rast_db, diff_attrs=diff_attrs)

    def antialias(self, color, rast, pos, tri):
        """See ``renderers.raster.antialias.antialias``."""
        return _antialias(color, rast, pos, tri)


class NvdiffrastRaster:
    """nvdiffrast's CUDA rasterizer behind the same interface (float32, CUDA tensors).

    The ``RasterizeCudaContext`` is created on first use, on the device of the tensors
    it is given, and kept per device.
    """

    def __init__(self):
        if not nvdiffrast_available():
            raise ImportError(
                "raster backend 'nvdiffrast' needs the package nvdiffrast (CUDA only): "
                '`pip install -e ".[cuda]"` installs it as diffrp-nvdiffrast (NVIDIA Source '
                "Code License, non-commercial use), or use backend 'torch'"
            )
        import nvdiffrast.torch as dr

        self._dr = dr
        self._contexts: dict[torch.device, object] = {}

    def _context(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"raster backend 'nvdiffrast' needs CUDA tensors, got device {device}")
        if device not in self._contexts:
            self._contexts[device] = self._dr.RasterizeCudaContext(device=device)
        return self._contexts[device]

    def rasterize(self, pos, tri, resolution):
        pos = _tr.as_batched_pos(pos).contiguous()
        ctx = self._context(pos.device)
        res = [int(s) for s in resolution]
        return self._dr.rasterize(ctx, pos, tri.int().contiguous(), resolution=res)

    def interpolate(self, attr, rast, tri, rast_db=None, diff_attrs=None):
        attr = attr.contiguous() if attr.ndim == 3 else attr[None].contiguous()
        return self._dr.interpolate(
            attr, rast, tri.int().contiguous(), rast_db=rast_db, diff_attrs=diff_attrs
        )

    def antialias(self, color, rast, pos, tri):
        pos = _tr.as_batched_pos(pos).contiguous()
        return self._dr.antialias(color.contiguous(), rast, pos, tri.int().contiguous())


class AutoRaster:
    """Chooses per call: nvdiffrast for CUDA tensors when it is importable, else torch.

    The choice is made from the device of the call's first tensor, so one object serves a
    CPU test and a CUDA run alike.
    """

    def __init__(self):
        self._torch = TorchRaster()
        self._nv: NvdiffrastRaster | None = None

    def _pick(self, tensor: torch.Tensor):
        if tensor.is_cuda and nvdiffrast_available():
            if self._nv is None:
                self._nv = NvdiffrastRaster()
            return self._nv
        return self._torch

    def rasterize(self, pos, tri, resolution):
        return self._pick(pos).rasterize(pos, tri, resolution)

    def interpolate(self, attr, rast, tri, rast_db=None, diff_attrs=None):
        return self._pick(rast).interpolate(attr, rast, tri, rast_db, diff_attrs)

    def antialias(self, color, rast, pos, tri):
        return self._pick(color).antialias(color, rast, pos, tri)
