"""``prd eval``: score a prompt set under the paper's protocol (``prd.evaluate``).

    prd eval --ckpt RUN --prompts FILE --clip DIR --out OUT     # sample, then score
    prd eval --meshes DIR --prompts FILE --clip DIR --out OUT   # score existing meshes

With --ckpt each prompt is sampled as ``prd sample`` does and written to
``OUT/meshes/<name>.glb``; those files are then scored exactly as --meshes scores a
folder, where the mesh of a prompt is ``DIR/<name>.glb`` (.obj, .ply also read) with
<name> the file name ``prd sample --prompts-file`` gives it. Outputs: ``prd.eval_report``.
A prompt whose mesh is missing, unreadable or empty is reported (stderr, scores.json) and
the others are scored; the exit status is then 2.
"""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

from prd.clip_score import ClipEmbedder
from prd.config import read_prompt_lines
from prd.eval_report import write_report
from prd.evaluate import Mesh, MeshLoadError, ViewProtocol, evaluate_meshes, find_mesh, load_mesh


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="run folder (export/latest.safetensors) or weights file")
    src.add_argument("--meshes", help="folder of meshes named as prd sample names them")
    p.add_argument("--prompts", required=True, help="prompt file, one a line, all distinct")
    p.add_argument("--clip", required=True, help="local transformers CLIPModel folder")
    p.add_argument("--out", required=True, help="output folder (views, scores, gallery)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (--ckpt)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (--ckpt)")


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of an evaluation file: non-blank lines, each once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    prompts = read_prompt_lines(path, "--prompts")
    first: dict[str, int] = {}
    for line, prompt in enumerate(prompts, 1):
        if prompt in first:
            raise ValueError(
                f"--prompts {path}: prompt {prompt!r} is listed twice (non-blank lines "
                f"{first[prompt]} and {line}); scores are kept per prompt"
            )
        first[prompt] = line
    return prompts


def sample_meshes(
    cfg, weights: Path, seed: int, prompts: list[str], names: list[str], folder: Path, device
) -> list[Mesh | Exception]:
    """Sample each prompt with the run's student (config and weights from
    ``prd.sample.resolve_config``), write ``folder/<name>.glb`` and load it back (an empty
    surface or an unreadable file stands in for that prompt's mesh)."""
    from prd.export import export_mesh
    from prd.model import build_model
    from prd.sample import EmptySurface, generate
    from prd.weights import load_weights

    # train.seed rebuilds the in-code base weights of a tiny run exactly (as prd sample)
    model = build_model(cfg, device=device, seed=cfg.train.seed).eval()
    load_weights(model, weights)
    folder.mkdir(parents=True, exist_ok=True)
    meshes: list[Mesh | Exception] = []
    for prompt, name in zip(prompts, names):
        try:
            s = generate(model, prompt, cfg.sample, seed)
            path = export_mesh(s.verts, s.faces, s.colors, folder / f"{name}.glb")
            meshes.append(load_mesh(path))
        except (EmptySurface, MeshLoadError) as exc:
            meshes.append(exc)
    return meshes


def run(args) -> int:
    from prd.sample import file_names, resolve_config, resolve_device

    prompts = read_prompts(args.prompts)
    names = file_names(prompts)
    if args.meshes is not None:
        if not Path(args.meshes).is_dir():
            raise FileNotFoundError(f"--meshes {args.meshes}: no such folder")
        if args.overrides:
            raise ValueError(f"config overrides {args.overrides} apply to --ckpt only")
    else:
        run_cfg = Namespace(ckpt=args.ckpt, config=[], overrides=args.overrides)
        cfg, weights = resolve_config(run_cfg)  # a bad --ckpt fails before CLIP loads
    device = resolve_device(args.device)
    embedder = ClipEmbedder(args.clip, device)  # a bad folder fails before any sampling
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ckpt is not None:
        meshes = sample_meshes(cfg, weights, args.seed, prompts, names, out / "meshes", device)
        source = {"ckpt": str(args.ckpt), "meshes": str(out / "meshes"), "seed": args.seed}
    else:
        meshes = []
        for name in names:
            try:
                meshes.append(load_mesh(find_mesh(Path(args.meshes), name)))
            except MeshLoadError as exc:
                meshes.append(exc)
        source = {"meshes": str(args.meshes)}
    protocol = ViewProtocol()
    ev = evaluate_meshes(prompts, names, meshes, embedder, protocol, device)
    write_report(out, ev, protocol, clip=str(args.clip), source=source)
    print(f"{out}: {json.dumps(ev.mean)}")
    for prompt, error in ev.failed.items():
        print(f"prd eval: {prompt!r} not scored: {error}", file=sys.stderr)
    return 2 if ev.failed else 0
