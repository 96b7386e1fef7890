"""``prd sample``: prompts -> K DDIM steps -> VAE decode -> SDF grid -> marching cubes ->
vertex colours -> mesh files, with a per-stage time breakdown."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prd.config import Config, SampleConfig, load, read_prompt_lines
from prd.configio import load_config_text
from prd.export import SUFFIXES, export_mesh, simplify, slugify
from prd.model import PRDModel, build_model
from prd.progressive import add_noise, eps_from_x0, progressive_timesteps
from prd.weights import load_weights, read_config_yaml
from renderers.isosurface import evaluate_grid, extract_surface


class EmptySurface(RuntimeError):
    """The sampled SDF has no zero crossing on the grid: there is no mesh to write."""


@dataclass
class Timer:
    """Wall time per named stage (seconds), in the order the stages ran."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class Sample:
    prompt: str
    verts: torch.Tensor  # (V, 3) world frame, +z up
    faces: torch.Tensor  # (F, 3) int64
    colors: torch.Tensor  # (V, 3) in [0, 1]
    field: object  # the TriplaneField (for texture baking)


@torch.no_grad()
def generate_batch(
    model: PRDModel,
    prompts: list[str],
    cfg: SampleConfig,
    seed: int,
    timer: Timer | None = None,
) -> list[Sample | EmptySurface]:
    """B prompts -> B coloured meshes, the networks run once on the whole batch (B x 6
    planes per UNet step, one VAE decode, one grid evaluation). Each prompt's noise comes
    from its own generator seeded with ``seed`` alone, so a prompt gives the same mesh
    whatever else is sampled with it, one by one or in any batch (up to float rounding
    of batched kernels). A prompt whose SDF has no zero crossing gets an ``EmptySurface``
    in its place. ``timer`` times the batch's stages."""
    if not prompts:
        raise ValueError("generate_batch: no prompts")
    timer = timer or Timer()
    student = model.student
    device = student.alphas_cumprod.device
    size = student.cfg.resolved_latent_size()
    planes, b = student.cfg.planes, len(prompts)
    with timer("text_encode"):
        text = student.encode_text(list(prompts))
    gens = [torch.Generator().manual_seed(seed) for _ in prompts]
    z = torch.cat([torch.randn(planes, 4, size, size, generator=g) for g in gens]).to(device)
    timesteps = progressive_timesteps(cfg.steps)
    ab = student.alphas_cumprod
    for i, t_i in enumerate(timesteps):
        with timer(f"unet_step_{i + 1}"):
            t = torch.full((b * planes,), t_i, dtype=torch.long, device=device)
            x0 = student.predict_x0(z, t, text)
            if i + 1 < len(timesteps):
                t_next = torch.full_like(t, timesteps[i + 1])
                if cfg.renoise == "ddim":
                    noise = eps_from_x0(z, x0, t, ab)
                else:
                    draws = [torch.randn(planes, 4, size, size, generator=g) for g in gens]
                    noise = torch.cat(draws).to(device)
                z = add_noise(x0, noise, t_next, ab)
    with timer("vae_decode"):
        geometry, texture = student.decode(x0)
        fld = model.field(geometry, texture)
    with timer("grid_eval"):
        grid = evaluate_grid(fld, cfg.grid, n_objects=b, device=device)
    with timer("marching_cubes"):
        meshes = extract_surface(
            fld, cfg.grid, n_objects=b, grid=grid, with_grad=False, method=cfg.isosurface
        )
    out: list[Sample | EmptySurface] = []
    with timer("vertex_colors"):
        for o, (prompt, mesh) in enumerate(zip(prompts, meshes, strict=True)):
            if mesh.empty:
                out.append(
                    EmptySurface(
                        f"the SDF of {prompt!r} (seed {seed}) has no zero crossing on the "
                        f"{cfg.grid}^3 grid: nothing to mesh (an untrained or diverged "
                        "student can do this)"
                    )
                )
                continue
            one = model.field(geometry[o : o + 1], texture[o : o + 1])
            colors = one.color(mesh.verts[None].to(geometry.dtype))[0]
            out.append(Sample(prompt, mesh.verts, mesh.faces, colors, one))
    return out


def generate(
    model: PRDModel, prompt: str, cfg: SampleConfig, seed: int, timer: Timer | None = None
) -> Sample:
    """One prompt -> one coloured mesh (``generate_batch`` of one); raises EmptySurface."""
    (result,) = generate_batch(model, [prompt], cfg, seed, timer)
    if isinstance(result, EmptySurface):
        raise result
    return result


TRAINING_PATHS = ("prompts.source", "prompts.file", "train.deepspeed_json")
"""Config keys naming files that only training reads (checked to exist when loaded)."""


def resolve_config(args) -> tuple[Config, Path | None]:
    """The config to sample with and the weights file, from --ckpt / --config / overrides."""
    weights = None
    if args.ckpt:
        ckpt = Path(args.ckpt)
        weights = ckpt / "export" / "latest.safetensors" if ckpt.is_dir() else ckpt
        if not weights.is_file():
            raise FileNotFoundError(
                f"--ckpt {ckpt}: no exported weights at {weights} (a run folder of prd train "
                "holds export/latest.safetensors after its first checkpoint)"
            )
        if args.config:
            raise ValueError("--ckpt brings its own config; pass changes as key=value overrides")
        # the run's training inputs need not exist where it is sampled (relative paths,
        # another machine), and sampling does not read them
        unused = [f"{key}=null" for key in TRAINING_PATHS]
        text = read_config_yaml(weights)
        return load_config_text(Config, text, [*unused, *args.overrides]), weights
    if not args.config:
        raise ValueError("give --config CONFIG (initial weights) or --ckpt RUN_DIR")
    return load(args.config, args.overrides), None


def add_arguments(p) -> None:
    p.add_argument("--config", action="append", default=[], help="YAML preset (repeatable)")
    p.add_argument("--ckpt", help="run folder (its export/latest.safetensors) or weights file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; --out names the file")
    src.add_argument("--prompts-file", help="one prompt a line; --out names a folder")
    p.add_argument("--out", required=True, help="output file (.glb/.obj/.ply) or folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size", type=int, default=1, help="prompts per network pass (same meshes)"
    )
    p.add_argument("--texture", action="store_true", help="bake a UV texture (GLB)")
    p.add_argument("--max-faces", type=int, default=None, help="simplify to this many faces")
    p.add_argument("--preview", action="store_true", help="also write a turntable GIF")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON line per mesh")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")


def resolve_device(name: str) -> torch.device:
    """--device: "auto" (CUDA when present, else CPU) or a torch device usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # e.g. "cuda" on a machine without CUDA fails here
    except (RuntimeError, AssertionError) as exc:
        raise ValueError(f"--device {name!r} is not usable here: {exc}") from None
    return device


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and try a file in it, so a bad --out fails before any sampling."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"--out: cannot write files in {folder}: {exc.strerror or exc}") from None


def _jobs(args, cfg: Config) -> list[tuple[str, Path]]:
    """(prompt, output path) pairs, checked before the model is built; file names from
    ``file_names``."""
    out = Path(args.out)
    if out.suffix and out.suffix.lower() not in SUFFIXES:
        raise ValueError(f"--out {out}: a mesh file must end in one of {SUFFIXES}")
    if args.prompt is not None:
        if out.suffix == "":
            out = out / f"{slugify(args.prompt)}.{cfg.sample.format}"
        _check_writable(out.parent)
        return [(args.prompt, out)]
    if out.suffix:
        raise ValueError(f"--out {out}: with --prompts-file, --out names a folder")
    path = Path(args.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path}: no such file")
    prompts = read_prompt_lines(path, "--prompts-file")
    jobs = [(p, out / f"{n}.{cfg.sample.format}") for p, n in zip(prompts, file_names(prompts))]
    _check_writable(out)
    return jobs


def file_names(prompts: list[str]) -> list[str]:
    """The file stem of each prompt's mesh: its slug, with "-2", "-3", ... for later prompts
    of an earlier prompt's slug, so no file overwrites another (``prd eval`` finds meshes
    and names its view folders by these)."""
    names, seen = [], {}
    for prompt in prompts:
        slug = slugify(prompt)
        seen[slug] = seen.get(slug, 0) + 1
        names.append(slug if seen[slug] == 1 else f"{slug}-{seen[slug]}")
    return names


def run(args) -> int:
    cfg, weights = resolve_config(args)
    device = resolve_device(args.device)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    jobs = _jobs(args, cfg)
    if args.texture and any(out.suffix.lower() != ".glb" for _, out in jobs):
        raise ValueError("--texture bakes a texture into .glb files only")
    timer = Timer()
    with timer("build_model"):
        # train.seed: the initial weights prd train starts from (rank 0), so the in-code
        # base weights of a tiny run are rebuilt exactly for its adapters
        model = build_model(cfg, device=device, seed=cfg.train.seed).eval()
        if weights is not None:
            load_weights(model, weights)
    status = 0
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        timer_b = Timer()
        results = generate_batch(model, [p for p, _ in batch], cfg.sample, args.seed, timer_b)
        for (_, out), sample in zip(batch, results, strict=True):
            if isinstance(sample, EmptySurface):
                print(f"prd sample: {sample}", file=sys.stderr)
                status = 2
                continue
            # each mesh's share of the batch's stages, then its own export
            timer_p = Timer({k: v / len(batch) for k, v in timer_b.stages.items()})
            report = write_sample(args, sample, out, timer_p)
            report["batch_size"] = len(batch)
            if args.json:
                print(json.dumps(report))
            else:
                stages = ", ".join(f"{k} {v:.3f}s" for k, v in timer_p.stages.items())
                print(f"{out}: {report['faces']} faces, {report['total_seconds']:.2f}s ({stages})")
    return status


def write_sample(args, sample: Sample, out: Path, timer_p: Timer) -> dict:
    """Simplify (--max-faces), export and preview one mesh; its report."""
    verts, faces, colors = sample.verts, sample.faces, sample.colors
    if args.max_faces is not None:
        with timer_p("simplify"):
            verts, faces, colors = simplify(verts, faces, colors, args.max_faces)
    with timer_p("export"):
        color_fn = None
        if args.texture:
            color_fn = lambda p, f=sample.field: f.color(p[None].float())[0]
        export_mesh(verts, faces, colors, out, texture=args.texture, color_fn=color_fn)
    if args.preview:
        from prd.preview import turntable

        with timer_p("preview"):
            turntable(verts, faces, colors, out.with_suffix(".gif"))
    return {
        "prompt": sample.prompt,
        "out": str(out),
        "vertices": len(verts),
        "faces": len(faces),
        "faces_extracted": len(sample.faces),
        "seconds": {k: round(v, 4) for k, v in timer_p.stages.items()},
        "total_seconds": round(sum(timer_p.stages.values()), 4),
    }
