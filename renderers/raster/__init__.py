"""Differentiable triangle rasterization with nvdiffrast's interface and conventions.

Every backend has the three ops of nvdiffrast (Laine et al. 2020), minus its GL/CUDA
context argument:

- ``rasterize(pos, tri, resolution) -> (rast, rast_db)``: pos (V, 4) or (B, V, 4) OpenGL
  clip coordinates, tri (F, 3) int32, resolution (H, W). ``rast`` (B, H, W, 4) holds
  (u, v, z/w, triangle_id + 1), zeros on background; u and v are the perspective-correct
  weights of the triangle's vertices 1 and 2. Pixel centres sit at NDC 2(px + 0.5)/W - 1;
  image row 0 is the *bottom* row (renderers flip to the project's top-row-first images).
  No backface culling; the nearest z/w wins.
- ``interpolate(attr, rast, tri, rast_db=None, diff_attrs=None) -> (out, out_da)``.
- ``antialias(color, rast, pos, tri) -> color``: the only source of visibility gradients.

Gradients reach ``pos`` through u, v, z/w (and through antialias); coverage and ids are
not differentiable.
"""

from __future__ import annotations

from renderers.raster.antialias import antialias, edge_neighbours
from renderers.raster.backends import (
    AutoRaster,
    NvdiffrastRaster,
    TorchRaster,
    nvdiffrast_available,
)
from renderers.raster.torch_raster import interpolate, rasterize

Backend = TorchRaster | NvdiffrastRaster | AutoRaster


def get_backend(name: str) -> Backend:
    """The backend named by a config value: "torch", "nvdiffrast" or "auto".

    "auto" returns an ``AutoRaster``, which decides at each call: nvdiffrast when it is
    importable and the tensors are on CUDA, the torch backend otherwise. "nvdiffrast"
    fails here, naming the package, when it is not installed.
    """
    if name == "torch":
        return TorchRaster()
    if name == "nvdiffrast":
        return NvdiffrastRaster()
    if name == "auto":
        return AutoRaster()
    raise ValueError(f"raster backend must be 'auto', 'torch' or 'nvdiffrast', got {name!r}")


__all__ = [
    "AutoRaster",
    "Backend",
    "NvdiffrastRaster",
    "TorchRaster",
    "antialias",
    "edge_neighbours",
    "get_backend",
    "interpolate",
    "nvdiffrast_available",
    "rasterize",
]
