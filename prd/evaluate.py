"""Evaluation under the paper's protocol: each prompt's mesh rendered at 4 views and
scored by CLIP (``prd.clip_score``), plus Chamfer, colour error and silhouette IoU for
prompts of the oracle's analytic vocabulary (``prd.oracle_eval``).

Views (``ViewProtocol``), after the reference's evaluation renders (TriplaneTurbo's
evaluation script drives kiui's mesh renderer: albedo mode, white background, 512 x 512,
elevation 15 degrees above the horizon, 4 azimuths, fov 50, camera distance 3, meshes
resized into [-0.9, 0.9]^3):

- the mesh is centred on its bounding box and scaled so its longest side is 1.8 (kiui's
  ``auto_size(bound=0.9)``), in the project's world frame (+z up, ``renderers.cameras``);
- cameras at azimuth 0/90/180/270 degrees (from +x towards +y), elevation 15 degrees,
  distance 3.0, vertical fov 50 degrees, looking at the origin;
- unlit vertex colours, interpolated over the faces, composited on a white background
  (1, 1, 1) and antialiased by the project's rasterizer (``renderers.raster``, torch
  backend unless CUDA and nvdiffrast); 512 x 512, 8-bit RGB: the exact images scored.

The same functions score meshes during training (``TrainingEval``, ``train.eval_every``)
and in ``prd eval`` (``prd.eval_cmd``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from prd.clip_score import TEXT_PREFIX, ClipEmbedder, score_views, texts_for
from prd.export import WORLD_TO_GLTF
from prd.oracle_eval import mesh_quality
from renderers.cameras import orbit_cameras, world_to_clip
from renderers.raster import get_backend
from teachers.scenes import parse_prompt


@dataclass(frozen=True)
class ViewProtocol:
    """How a mesh is rendered for scoring (module docstring)."""

    resolution: int = 512
    """Square image size in pixels (the paper: 512 x 512)."""
    azimuths: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)
    """Camera azimuths in degrees (the paper: 4 views, 90 degrees apart from 0)."""
    elevation: float = 15.0
    """Camera elevation above the horizon in degrees (reference renders: 15)."""
    distance: float = 3.0
    """Camera distance to the mesh centre (kiui's renderer default, used by the reference)."""
    fov_y: float = 50.0
    """Vertical field of view in degrees (kiui's renderer default)."""
    bound: float = 0.9
    """Half of the longest bounding-box side after resizing (kiui's auto_size default)."""
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """RGB in [0, 1] behind the mesh (the reference: white)."""

    def as_dict(self) -> dict:
        return {**asdict(self), "shading": "unlit vertex colours", "text_prefix": TEXT_PREFIX}


@dataclass
class Mesh:
    """A vertex-coloured triangle mesh in the world frame (+z up)."""

    verts: torch.Tensor  # (V, 3) float32
    faces: torch.Tensor  # (F, 3) int64
    colors: torch.Tensor  # (V, 3) float32 in [0, 1]


class MeshLoadError(ValueError):
    """A mesh file is missing, unreadable or empty (the message names the file)."""


def find_mesh(folder: Path, name: str) -> Path:
    """``folder/name.glb`` (or .obj / .ply, in that order): the file ``prd sample`` writes
    for a prompt whose file name is ``name``; MeshLoadError naming what was looked for."""
    for suffix in (".glb", ".obj", ".ply"):
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    raise MeshLoadError(f"no mesh {folder / name}.glb (nor .obj / .ply)")


def load_mesh(path: str | Path) -> Mesh:
    """A GLB / OBJ / PLY file as written by ``prd.export`` (or any trimesh reads) -> Mesh.

    GLB and OBJ hold +y-up coordinates and are rotated back to the +z-up world
    (``prd.export``); PLY files are in the world frame. Vertex colours, or a texture
    sampled at the vertices' UVs; a file without colours gets trimesh's default grey.
    """
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise MeshLoadError(f"{path}: no such mesh file")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
        visual = mesh.visual.to_color() if mesh.visual.kind == "texture" else mesh.visual
        rgba = np.asarray(visual.vertex_colors, dtype=np.float32)
    except Exception as exc:  # trimesh raises many types on a corrupt file
        raise MeshLoadError(f"{path}: cannot read the mesh ({type(exc).__name__}: {exc})") from exc
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if len(verts) == 0 or len(faces) == 0:
        raise MeshLoadError(f"{path}: the mesh is empty ({len(verts)} verts, {len(faces)} faces)")
    if path.suffix.lower() != ".ply":
        verts = verts @ WORLD_TO_GLTF  # file = R world, so world = R^T file (rows: v R)
    return Mesh(
        torch.from_numpy(verts).float(),
        torch.from_numpy(faces),
        torch.from_numpy(rgba[:, :3] / 255.0),
    )


def mesh_from_sample(verts, faces, colors) -> Mesh:
    """A sampled mesh (tensors, any device), its colours rounded to 8 bits as a GLB stores
    them, so scores during training equal those of the exported file."""
    c = (colors.detach().float().cpu().clamp(0, 1) * 255).round() / 255
    return Mesh(verts.detach().float().cpu(), faces.detach().long().cpu(), c)


@torch.no_grad()
def render_views(mesh: Mesh, protocol: ViewProtocol, device="cpu", backend=None) -> np.ndarray:
    """The protocol's views of a mesh: (n_views, H, W, 3) uint8, top row first."""
    backend = backend or get_backend("auto")
    v = mesh.verts.to(device, torch.float32)
    lo, hi = v.amin(0), v.amax(0)
    v = (v - (lo + hi) / 2) * (2 * protocol.bound / float((hi - lo).max().clamp_min(1e-12)))
    cams = orbit_cameras(
        protocol.azimuths, protocol.elevation, protocol.distance, protocol.fov_y, device=device
    )
    # the resized mesh fits in a sphere of radius bound * sqrt(3) around the origin
    reach = protocol.bound * math.sqrt(3.0) * 1.01
    near, far = max(protocol.distance - reach, 1e-3), protocol.distance + reach
    tri = mesh.faces.to(device, torch.int32)
    v_h = torch.cat([v, torch.ones_like(v[:, :1])], dim=1)
    pos = v_h @ world_to_clip(cams, near, far).transpose(1, 2)
    size = (protocol.resolution, protocol.resolution)
    rast, _ = backend.rasterize(pos.contiguous(), tri, size)
    n = len(cams)
    colors = mesh.colors.to(device, torch.float32).expand(n, -1, -1).contiguous()
    rgb, _ = backend.interpolate(colors, rast, tri)
    bg = torch.tensor(protocol.background, dtype=torch.float32, device=device)
    img = torch.where(rast[..., 3:] > 0, rgb, bg)
    img = backend.antialias(img.contiguous(), rast, pos, tri).flip(1).clamp(0, 1)
    return (img * 255).round().to(torch.uint8).cpu().numpy()


def is_oracle_prompt(prompt: str) -> bool:
    """True for prompts of the oracle's analytic vocabulary ("a red cube", ...)."""
    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


@dataclass
class Evaluation:
    """Scores of a prompt set: ``rows[prompt]`` and ``mean`` as in scores.json."""

    prompts: list[str]
    names: list[str]
    images: list[np.ndarray | None]
    rows: dict[str, dict] = field(default_factory=dict)
    mean: dict = field(default_factory=dict)

    @property
    def failed(self) -> dict[str, str]:
        return {p: r["error"] for p, r in self.rows.items() if "error" in r}


QUALITY_KEYS = ("chamfer", "color_error", "silhouette_iou")


def evaluate_meshes(
    prompts: list[str],
    names: list[str],
    meshes: list[Mesh | Exception],
    embedder: ClipEmbedder,
    protocol: ViewProtocol,
    device="cpu",
) -> Evaluation:
    """Render and score one mesh per prompt (an Exception in its place: that prompt fails
    with its message, the others are scored). Texts of all prompts, failed ones too, are
    the retrieval candidates."""
    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts must be distinct (scores are keyed by prompt)")
    backend = get_backend("auto")
    images = [
        None if isinstance(m, Exception) else render_views(m, protocol, device, backend)
        for m in meshes
    ]
    ev = Evaluation(list(prompts), list(names), images)
    ok = [i for i, im in enumerate(ev.images) if im is not None]
    n_views = len(protocol.azimuths)
    text_emb = embedder.embed_texts(texts_for(prompts))
    stack = np.concatenate([ev.images[i] for i in ok]) if ok else np.zeros((0, 1, 1, 3), np.uint8)
    owner = torch.tensor([i for i in ok for _ in range(n_views)], dtype=torch.long)
    s = score_views(embedder.embed_images(stack), text_emb, owner)
    for j, i in enumerate(ok):
        sl = slice(j * n_views, (j + 1) * n_views)
        views = [
            {
                "image": f"views/{names[i]}/{k}.png",
                "azimuth": protocol.azimuths[k],
                "cosine": float(s.cosine[sl][k]),
                "clip_score": float(s.clip_score[sl][k]),
                "top1": prompts[int(s.top1[sl][k])],
            }
            for k in range(n_views)
        ]
        row = {
            "clip_score": float(s.clip_score[sl].mean()),
            "r_at_1": float(s.hit[sl].float().mean()),
            "views": views,
        }
        if is_oracle_prompt(prompts[i]):
            m = meshes[i]
            q = mesh_quality(prompts[i], m.verts, m.faces, m.colors).as_dict()
            row.update({k: q[k] for k in QUALITY_KEYS})
        ev.rows[prompts[i]] = row
    for i, m in enumerate(meshes):
        if isinstance(m, Exception):
            ev.rows[prompts[i]] = {"clip_score": None, "r_at_1": None, "views": [], "error": str(m)}
    ev.rows = {p: ev.rows[p] for p in prompts}  # file order
    ev.mean = summarize(ev.rows, s)
    return ev


def summarize(rows: dict[str, dict], s) -> dict:
    """Means over the scored prompts (R@1 over their views); oracle metrics over the
    scored oracle prompts; the count of prompts that failed."""
    scored = [r for r in rows.values() if "error" not in r]
    mean = {
        "clip_score": float(np.mean([r["clip_score"] for r in scored])) if scored else None,
        "r_at_1": float(s.hit.float().mean()) if scored else None,
        "n_prompts": len(rows),
        "n_scored": len(scored),
    }
    oracle = [r for r in scored if "chamfer" in r]
    if oracle:
        mean.update({k: float(np.mean([r[k] for r in oracle])) for k in QUALITY_KEYS})
        mean["n_oracle"] = len(oracle)
    return mean


class TrainingEval:
    """The evaluation of ``prd eval`` on validation prompts during training (rank 0):
    every ``every`` steps each prompt is sampled as ``prd sample`` does (seed ``seed``),
    scored, and logged to TensorBoard (``eval/*``, and each prompt's 4 views) and returned
    for the step's metrics.jsonl line. The CLIP model loads at the first evaluation.
    """

    def __init__(self, every: int, prompts: list[str], clip: str, seed: int = 0):
        self.every, self.prompts, self.clip, self.seed = every, list(prompts), clip, seed
        self.protocol = ViewProtocol()
        self._embedder: ClipEmbedder | None = None

    @classmethod
    def from_config(cls, t) -> TrainingEval | None:
        """From a ``TrainConfig``'s eval fields; None when ``eval_every`` is 0. Checks the
        CLIP folder at once, so a bad one fails before training starts."""
        from prd.clip_score import check_clip_folder

        if not t.eval_every:
            return None
        check_clip_folder(t.eval_clip, "train.eval_clip")
        return cls(t.eval_every, t.eval_prompts, t.eval_clip)

    def __call__(self, step: int, model, sample_cfg, writer=None) -> dict:
        """{} off the schedule, else {"eval": means and per-prompt scores (no views)}."""
        from prd.sample import EmptySurface, file_names, generate

        if step % self.every:
            return {}
        device = model.student.alphas_cumprod.device
        if self._embedder is None:
            self._embedder = ClipEmbedder(self.clip, device, "train.eval_clip")
        was_training = model.training
        model.eval()
        meshes: list[Mesh | Exception] = []
        # sampling draws from its own seeded generator; the fork keeps any global draw out
        # of the training run's random streams all the same
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for prompt in self.prompts:
                try:
                    s = generate(model, prompt, sample_cfg, self.seed)
                    meshes.append(mesh_from_sample(s.verts, s.faces, s.colors))
                except EmptySurface as exc:
                    meshes.append(exc)
        model.train(was_training)
        names = file_names(self.prompts)
        ev = evaluate_meshes(self.prompts, names, meshes, self._embedder, self.protocol, device)
        if writer is not None:
            for key, value in ev.mean.items():
                if value is not None:
                    writer.add_scalar(f"eval/{key}", value, step)
            for name, images in zip(names, ev.images):
                if images is not None:
                    strip = np.concatenate(list(images[:, ::4, ::4]), axis=1)
                    writer.add_image(f"eval_views/{name}", strip, step, dataformats="HWC")
        rows = {p: {k: v for k, v in r.items() if k != "views"} for p, r in ev.rows.items()}
        return {"eval": {**ev.mean, "prompts": rows}}
