"""Marching cubes in torch: runs on the grid's device (docs/rendering.md, "Marching cubes").

The library marching cubes (scikit-image) runs on the host: on a GPU the sampler would copy
each 160^3 grid to the CPU and spend there about as long as its networks take on the chip
(docs/full_size.md, "The sampler"). This one is a few passes over the grid plus a sort of
the surface's edges, in torch, wherever the grid lives.

The case table is built here from one rule instead of being typed in. For each of the 256
sign patterns of a cell's 8 corners (inside: SDF < 0):

1. on each of the cell's 6 faces, walk its 4 corners counter-clockwise seen from outside
   the cell and join each crossing edge where the walk leaves the inside ("in -> out") to
   the crossing where it entered ("out -> in"), so the inside lies left of every segment;
   on a face with two diagonal inside corners (the ambiguous case) each inside corner is
   cut off on its own, a choice that depends only on the face's corners, so both cells
   that share it make the same one and the surface has no holes;
2. each crossing edge then starts one segment (on one of its two faces) and ends another
   (on the other), so the segments close into loops round the cell's surface;
3. each loop becomes a fan of triangles, wound so that normals point to positive SDF.

A vertex is the crossing of one grid edge (a, b), a its lower end, where every cell
around that edge puts it: edges are shared, not duplicated. Grid points with SDF exactly 0
count as outside, so the surface can pass through them; several edges then give vertices
at one point and their faces have zero area.
"""

from __future__ import annotations

import itertools
import math

import torch

ISOSURFACE_METHODS = ("skimage", "torch")
"""Where a surface's topology comes from: the library's marching cubes on the host, or
this module's on the grid's device."""

CORNERS = [((c >> 2) & 1, (c >> 1) & 1, c & 1) for c in range(8)]
"""Offset (along grid axes 0, 1, 2) of cell corner c: its bits, axis 0 the highest."""

EDGES = [(c, c | 1 << (2 - axis)) for axis in range(3) for c in range(8) if not CORNERS[c][axis]]
"""The cell's 12 edges as (lower corner, upper corner), 4 along each axis in turn."""

EDGE_AXIS = [axis for axis in range(3) for _ in range(4)]


def _cross(u: list[float], v: list[float]) -> list[float]:
    return [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]


def _faces() -> list[list[int]]:
    """The cell's 6 faces, each its 4 corners counter-clockwise seen from outside."""
    faces = []
    for axis, side in itertools.product(range(3), (0, 1)):
        normal = [0.0, 0.0, 0.0]
        normal[axis] = 1.0 if side else -1.0
        # u x v = normal: angles measured from u towards v increase counter-clockwise
        # seen from the side the normal points to
        u = [0.0, 0.0, 0.0]
        u[(axis + 1) % 3] = 1.0
        v = _cross(normal, u)
        corners = [c for c in range(8) if CORNERS[c][axis] == side]

        def angle(c, u=u, v=v):
            p = [x - 0.5 for x in CORNERS[c]]
            return math.atan2(sum(a * b for a, b in zip(p, v)), sum(a * b for a, b in zip(p, u)))

        faces.append(sorted(corners, key=angle))
    return faces


def _case_loops(inside: list[bool], faces: list[list[int]]) -> list[list[int]]:
    """Loops of crossing edges (edge ids) for one sign pattern, inside left of each step."""
    edge_id = {frozenset(e): i for i, e in enumerate(EDGES)}
    following = {}
    for ring in faces:
        crossings = []  # (leaves the inside?, edge id) in counter-clockwise order
        for k in range(4):
            a, b = ring[k], ring[(k + 1) % 4]
            if inside[a] != inside[b]:
                crossings.append((inside[a], edge_id[frozenset((a, b))]))
        for k, (leaves, edge) in enumerate(crossings):
            if leaves:  # join it to the entry just before it: cuts off one inside arc
                following[edge] = crossings[k - 1][1]
    loops, seen = [], set()
    for start in following:
        if start in seen:
            continue
        loop, edge = [], start
        while edge not in seen:
            seen.add(edge)
            loop.append(edge)
            edge = following[edge]
        loops.append(loop)
    return loops


def _edge_midpoint(edge: int) -> list[float]:
    a, b = EDGES[edge]
    return [(x + y) / 2 for x, y in zip(CORNERS[a], CORNERS[b])]


def _normal(tri: tuple[int, int, int]) -> list[float]:
    p, q, r = (_edge_midpoint(e) for e in tri)
    return _cross([q[i] - p[i] for i in range(3)], [r[i] - p[i] for i in range(3)])


def build_case_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(256, T, 3) int64 edge ids of each case's triangles (padded with -1) and (256,)
    triangle counts; case index = sum over inside corners c of 2^c."""
    faces = _faces()
    cases = []
    for case in range(256):
        inside = [bool(case >> c & 1) for c in range(8)]
        tris = []
        for loop in _case_loops(inside, faces):
            tris += [(loop[0], loop[i], loop[i + 1]) for i in range(1, len(loop) - 1)]
        cases.append(tris)
    # Wind every triangle like the one of corner 0 alone inside, whose outward side
    # (positive SDF) is towards (1, 1, 1): the rule of step 1 orients all cases alike.
    flip = sum(_normal(cases[1][0])) < 0
    width = max(len(t) for t in cases)
    table = torch.full((256, width, 3), -1, dtype=torch.int64)
    for case, tris in enumerate(cases):
        for i, (p, q, r) in enumerate(tris):
            table[case, i] = torch.tensor((p, r, q) if flip else (p, q, r))
    counts = torch.tensor([len(t) for t in cases], dtype=torch.int64)
    return table, counts


_TABLE: tuple[torch.Tensor, torch.Tensor] | None = None


def case_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``build_case_table`` (built once) on ``device``."""
    global _TABLE
    if _TABLE is None:
        _TABLE = build_case_table()
    return _TABLE[0].to(device), _TABLE[1].to(device)


def marching_cubes_torch(sdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero level set of one (R, R, R) grid, on its device.

    Returns edges (V, 2) int64: flat grid indices (i R + j) R + k of the two ends of the
    grid edge each vertex lies on, lower end first, sorted; faces (F, 3) int64 into
    them, counter-clockwise seen from positive SDF. Both empty without a strict sign change.
    """
    if sdf.dim() != 3 or len(set(sdf.shape)) != 1:
        raise ValueError(f"marching cubes needs an (R, R, R) grid, got {tuple(sdf.shape)}")
    device, res = sdf.device, sdf.shape[0]
    empty = torch.zeros(0, 2, dtype=torch.int64, device=device)
    if not (sdf.min() < 0 < sdf.max()):
        return empty, empty.new_zeros(0, 3)
    table, counts = case_table(device)
    inside = (sdf < 0).to(torch.uint8)
    n = res - 1
    case = torch.zeros(n, n, n, dtype=torch.uint8, device=device)
    for c, (di, dj, dk) in enumerate(CORNERS):
        case |= inside[di : di + n, dj : dj + n, dk : dk + n] << c
    case = case.reshape(-1)
    cells = torch.nonzero((case != 0) & (case != 255)).squeeze(1)
    cell_case = case[cells].long()
    # lowest grid point of each active cell (cells are indexed on an n^3 grid)
    i, j, k = cells // (n * n), cells // n % n, cells % n
    base = (i * res + j) * res + k

    per_cell = counts[cell_case]
    owner = torch.repeat_interleave(torch.arange(len(cells), device=device), per_cell)
    first = torch.cumsum(per_cell, 0) - per_cell
    slot = torch.arange(len(owner), device=device) - first[owner]
    tri_edges = table[cell_case[owner], slot]  # (F, 3) cell edge ids

    stride = torch.tensor([res * res, res, 1], device=device)
    corner_offset = (torch.tensor(CORNERS, device=device) * stride).sum(1)
    lower = torch.tensor([a for a, _ in EDGES], device=device)
    axis = torch.tensor(EDGE_AXIS, device=device)
    # one key per grid edge: its lower end's flat index x 3 + its axis
    key = (base[owner, None] + corner_offset[lower[tri_edges]]) * 3 + axis[tri_edges]
    keys, faces = torch.unique(key.reshape(-1), return_inverse=True)
    a = keys // 3
    edges = torch.stack([a, a + stride[keys % 3]], dim=1)
    return edges, faces.reshape(-1, 3)
