"""``prd eval``: CLIP score and R@1 under the paper's protocol, on tiny random CLIP folders
written with save_pretrained (no hub), and its logging during training."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from prd import cli
from prd.clip_score import ClipEmbedder, score_views, texts_for
from prd.evaluate import (
    Mesh,
    ViewProtocol,
    evaluate_meshes,
    load_mesh,
    mesh_from_sample,
    render_views,
)
from prd.export import export_mesh
from prd.oracle_eval import mesh_quality
from prd.sample import file_names
from prompts.tokenizer import build_clip_tokenizer

COLORS = {
    "a red box": (0.9, 0.1, 0.1),
    "a blue box": (0.1, 0.2, 0.9),
    "a green box": (0.1, 0.8, 0.2),
    "a yellow box": (0.95, 0.85, 0.1),
}


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


def write_clip(folder: Path, tokenizer, seed: int = 0, text_projection=None) -> Path:
    """A tiny random CLIP folder: model, the project's CLIP tokenizer, a 32 px processor.
    text_projection: (proj, hidden) weight to put in place of the random one."""
    torch.manual_seed(seed)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(**layers, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(**layers, image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    if text_projection is not None:
        with torch.no_grad():
            model.text_projection.weight.copy_(text_projection)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


def box(color, size: float = 0.6) -> Mesh:
    m = trimesh.creation.box(extents=(size, size, size))
    colors = torch.tensor(color, dtype=torch.float32).expand(len(m.vertices), 3)
    return Mesh(torch.tensor(m.vertices).float(), torch.tensor(m.faces), colors)


def write_meshes(folder: Path, prompts: list[str]) -> dict[str, Path]:
    """One uniform-colour box GLB per prompt, named as prd sample names them."""
    paths = {}
    for prompt, name in zip(prompts, file_names(prompts)):
        m = box(COLORS[prompt])
        paths[prompt] = export_mesh(m.verts, m.faces, m.colors, folder / f"{name}.glb")
    return paths


def run_eval(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main(["eval", "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def prompt_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


# ---- the score itself -------------------------------------------------------------------


def test_score_views_known_values():
    """Unit vectors at known angles: cos, 2.5 max(cos, 0) x 100, top-1 among all texts."""
    angle = lambda deg: torch.tensor([math.cos(math.radians(deg)), math.sin(math.radians(deg))])
    text = torch.stack([angle(0), angle(90)])  # prompts 0 and 1
    image = torch.stack([angle(30), angle(80), angle(-120), angle(45)])
    owner = torch.tensor([0, 0, 1, 1])
    s = score_views(image, text, owner)
    cos = torch.tensor([math.cos(math.radians(a)) for a in (30, 80, 210, 45)])
    torch.testing.assert_close(s.cosine, cos)
    torch.testing.assert_close(s.clip_score, 250 * cos.clamp_min(0))
    assert s.clip_score[2] == 0  # a negative cosine scores 0, it does not subtract
    assert s.top1.tolist() == [0, 1, 0, 0]  # ties (45 degrees) go to the lower index
    assert s.hit.tolist() == [True, False, False, False]
    assert texts_for(["a red box"]) == ["A photo depicts a red box"]


# ---- prd eval --meshes ------------------------------------------------------------------


class _Gallery(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.images, self.refs, self.script = [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-prompt" in a:
            self.rows.append(a)
        if tag == "img":
            self.images.append(a["src"])
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        self.script |= tag == "script"


def test_scores_json_matches_a_recomputation_from_the_saved_pngs(tmp_path, capsys, clip_tokenizer):
    clip = write_clip(tmp_path / "clip", clip_tokenizer, seed=1)
    prompts = ["a red box", "a missing box", "a blue box", "a broken box"]
    scored = ["a red box", "a blue box"]
    meshes = tmp_path / "meshes"
    write_meshes(meshes, scored)
    (meshes / "a-broken-box.glb").write_bytes(b"glTF not really")
    out = tmp_path / "out"
    status, stdout, err = run_eval(
        capsys, "--meshes", meshes, "--prompts", prompt_file(tmp_path / "p.txt", prompts),
        "--clip", clip, "--out", out,
    )  # fmt: skip
    # one missing and one corrupt mesh: named, and the other three are scored
    assert status == 2
    assert "a-missing-box.glb" in err and "a-broken-box.glb" in err
    doc = json.loads((out / "scores.json").read_text())
    assert list(doc["prompts"]) == prompts
    for bad in ("a missing box", "a broken box"):
        row = doc["prompts"][bad]
        assert row["clip_score"] is None and row["views"] == [] and row["error"]
    assert "a-broken-box.glb" in doc["prompts"]["a broken box"]["error"]

    # by hand: the saved PNGs through the folder's processor and CLIPModel.forward, against
    # the prefixed texts of all four prompts (failed ones stay retrieval candidates)
    model = CLIPModel.from_pretrained(clip).eval()
    processor = CLIPImageProcessor.from_pretrained(clip)
    tokenizer = CLIPTokenizer.from_pretrained(clip)
    pngs, owner = [], []
    for prompt, name in zip(prompts, file_names(prompts)):
        if prompt in scored:
            for k in range(4):
                img = Image.open(out / "views" / name / f"{k}.png")
                assert img.size == (512, 512) and img.mode == "RGB"
                pngs.append(img)
                owner.append(prompts.index(prompt))
    assert not (out / "views" / "a-missing-box").exists()
    texts = tokenizer(["A photo depicts " + p for p in prompts], padding=True, return_tensors="pt")
    pixels = processor(images=pngs, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        o = model(**texts, pixel_values=pixels)
    cos = (o.image_embeds @ o.text_embeds.T).numpy()
    own = cos[np.arange(len(owner)), owner]
    top1 = cos.argmax(axis=1)
    for j, prompt in enumerate(scored):
        row = doc["prompts"][prompt]
        sl = slice(4 * j, 4 * j + 4)
        assert [v["cosine"] for v in row["views"]] == pytest.approx(own[sl], abs=1e-5)
        want = 250 * np.maximum(own[sl], 0)
        assert [v["clip_score"] for v in row["views"]] == pytest.approx(want, abs=1e-3)
        assert [v["top1"] for v in row["views"]] == [prompts[i] for i in top1[sl]]
        assert row["clip_score"] == pytest.approx(want.mean(), abs=1e-3)
        assert row["r_at_1"] == pytest.approx(np.mean(top1[sl] == owner[4 * j]))
        assert [v["azimuth"] for v in row["views"]] == [0, 90, 180, 270]
    mean = doc["mean"]
    assert mean["clip_score"] == pytest.approx(250 * np.maximum(own, 0).mean(), abs=1e-3)
    assert mean["r_at_1"] == pytest.approx(np.mean(top1 == np.array(owner)))
    assert (mean["n_prompts"], mean["n_scored"]) == (4, 2)
    assert (
        doc["protocol"]["resolution"] == 512
        and doc["protocol"]["text_prefix"] == "A photo depicts "
    )
    assert json.loads(stdout.split(": ", 1)[1]) == mean

    # the gallery: every prompt, its scores, images by relative paths inside OUT, no
    # external resource, a sorting script; the markdown table: one row per prompt + mean
    page = (out / "index.html").read_text()
    g = _Gallery()
    g.feed(page)
    assert [r["data-prompt"] for r in g.rows] == prompts
    for r in g.rows:
        want = doc["prompts"][r["data-prompt"]]["clip_score"]
        assert (r["data-clip_score"] == "") if want is None else float(r["data-clip_score"]) == want
    assert len(g.images) == 8 and all((out / src).is_file() for src in g.images)
    assert not any(re.match(r"[a-z]+:|/", ref) for ref in g.refs)
    assert g.script and "http" not in page
    table = (out / "scores.md").read_text().splitlines()
    assert len(table) == 2 + 4 + 1 and table[2].startswith("| a red box |")


def test_r_at_1_is_one_for_matching_texts_and_zero_when_shuffled(tmp_path, clip_tokenizer):
    """Known answer: the text projection of a random CLIP is solved so that the text
    embedding of prompt i equals the image embedding of prompt pi(i)'s views (uniform
    boxes look the same from the 4 azimuths). pi = identity: every view finds its own
    text at cosine 1 (CLIP score 250, R@1 1); pi a derangement: none does (R@1 0)."""
    prompts = list(COLORS)
    meshes = tmp_path / "meshes"
    paths = write_meshes(meshes, prompts)
    base = write_clip(tmp_path / "clip", clip_tokenizer, seed=2)
    embedder = ClipEmbedder(base)
    # the known answer holds at any size: 64 px keeps the test fast (prd eval's 512 px path
    # is the recomputation test's)
    protocol = ViewProtocol(resolution=64)
    views = {p: embedder.embed_images(render_views(load_mesh(paths[p]), protocol)) for p in prompts}
    for p in prompts:  # the 4 views of a uniform box embed alike
        assert (views[p] @ views[p][0]).min() > 1 - 1e-4
    model = embedder.model
    ids = embedder.tokenizer(texts_for(prompts), padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.text_model(**ids).pooler_output  # (P, hidden)
    # without the prefix the same texts land elsewhere: the prefix is what is matched below
    bare = embedder.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        bare_pooled = model.text_model(**bare).pooler_output

    def solved_clip(order: list[int], name: str) -> Path:
        target = torch.stack([views[prompts[i]][0] for i in order])  # (P, proj)
        weight = (torch.linalg.pinv(pooled) @ target).T  # pooled @ weight.T = target
        torch.testing.assert_close(pooled @ weight.T, target, atol=1e-4, rtol=0)
        no_prefix = torch.nn.functional.normalize(bare_pooled @ weight.T, dim=-1)
        assert (no_prefix * target).sum(-1).max() < 0.99
        return write_clip(tmp_path / name, clip_tokenizer, seed=2, text_projection=weight)

    names, loaded = file_names(prompts), [load_mesh(paths[p]) for p in prompts]
    shuffle = [1, 2, 3, 0]  # text i <- images of prompt shuffle[i]
    for order, name in ((list(range(4)), "matched"), (shuffle, "shuffled")):
        ev = evaluate_meshes(
            prompts, names, loaded, ClipEmbedder(solved_clip(order, name)), protocol
        )
        doc = {"prompts": ev.rows, "mean": ev.mean}
        if name == "matched":
            assert doc["mean"]["r_at_1"] == 1.0
            assert doc["mean"]["clip_score"] == pytest.approx(250.0, abs=0.05)
            for p in prompts:
                assert [v["top1"] for v in doc["prompts"][p]["views"]] == [p] * 4
        else:
            assert doc["mean"]["r_at_1"] == 0.0
            for i, p in enumerate(prompts):
                # views of prompt shuffle[i] retrieve text i
                row = doc["prompts"][prompts[shuffle[i]]]
                assert [v["top1"] for v in row["views"]] == [p] * 4
                assert row["r_at_1"] == 0.0


def test_views_follow_the_stated_protocol():
    """Framing, elevation and azimuths against closed forms. A flat disc (resized to radius
    0.9) at elevation 15, distance 3, fov 50: its near and far rims project to the rows
    given by their angles below the optical axis; a sphere's disc has the area of its cone
    of tangents; two markers show the azimuth convention (camera at +x looks at -x, +y on
    the right)."""
    p = ViewProtocol(azimuths=(0.0,))  # one view: the rest of the protocol as stated
    assert (p.resolution, p.elevation, p.distance, p.fov_y) == (512, 15.0, 3.0, 50.0)
    assert ViewProtocol().azimuths == (0.0, 90.0, 180.0, 270.0)
    f = (p.resolution / 2) / math.tan(math.radians(p.fov_y / 2))
    disc = trimesh.creation.cylinder(radius=1.0, height=1e-3, sections=64)
    gray = torch.full((len(disc.vertices), 3), 0.5)
    img = render_views(Mesh(torch.tensor(disc.vertices).float(), torch.tensor(disc.faces), gray), p)
    assert img.shape == (1, 512, 512, 3) and img.dtype == np.uint8
    col = img[0, :, 256, 0] < 200  # the disc's rows in the centre column
    rows = np.flatnonzero(col)
    e, d, r = math.radians(p.elevation), p.distance, p.bound

    def row_of(x):  # a rim point (x, 0, 0): its angle below the horizon, minus the axis'
        return 256 + f * math.tan(math.atan2(d * math.sin(e), d * math.cos(e) - x) - e)

    assert rows.min() == pytest.approx(row_of(-r), abs=1.0)  # far rim, top
    assert rows.max() + 1 == pytest.approx(row_of(r), abs=1.0)  # near rim, bottom
    assert img[0, 256, 256].tolist() == [128, 128, 128]  # unlit colour, 8 bits
    assert img[0, 0, 0].tolist() == [255, 255, 255]  # white background

    sphere = trimesh.creation.icosphere(subdivisions=3)
    mesh = Mesh(
        torch.tensor(sphere.vertices).float(),
        torch.tensor(sphere.faces),
        gray[:1].expand(len(sphere.vertices), 3),
    )
    area = (render_views(mesh, p)[0, ..., 0] < 192).sum()
    radius_px = f * math.tan(math.asin(r / d))
    assert area == pytest.approx(math.pi * radius_px**2, rel=0.02)

    red, blue = trimesh.creation.box(extents=(0.2,) * 3), trimesh.creation.box(extents=(0.2,) * 3)
    red.apply_translation((0.8, 0, 0))
    blue.apply_translation((0, 0.8, 0))
    both = trimesh.util.concatenate([red, blue])
    colors = torch.tensor([[1.0, 0, 0]] * 8 + [[0, 0, 1.0]] * 8)
    three = ViewProtocol(resolution=128, azimuths=(0.0, 90.0, 180.0))
    img = render_views(
        Mesh(torch.tensor(both.vertices).float(), torch.tensor(both.faces), colors), three
    )

    def centre_x(view, channel):  # mean column of the pixels of one marker
        other = [c for c in range(3) if c != channel]
        hit = (img[view][..., channel] > 200) & (img[view][..., other] < 60).all(-1)
        return np.nonzero(hit)[1].mean()

    assert centre_x(0, 2) > centre_x(0, 0)  # azimuth 0: +y (blue) right of +x (red)
    assert centre_x(1, 0) < centre_x(1, 2)  # azimuth 90: +x (red) on the left
    assert centre_x(2, 2) < centre_x(2, 0)  # azimuth 180: +y on the left


def test_oracle_prompts_add_chamfer_colour_and_iou(tmp_path, clip_tokenizer):
    """An exact oracle scene (the 0.6 red cube) through a GLB: its quality scores are
    prd.oracle_eval's, near their ideal values; a non-oracle prompt gets none."""
    paths = {
        "a red cube": export_mesh(*_fields(box((0.9, 0.1, 0.1), 0.6)), tmp_path / "a-red-cube.glb"),
        "a red box": export_mesh(*_fields(box((0.9, 0.1, 0.1), 0.6)), tmp_path / "a-red-box.glb"),
    }
    meshes = [load_mesh(paths[p]) for p in paths]
    embedder = ClipEmbedder(write_clip(tmp_path / "clip", clip_tokenizer))
    small = ViewProtocol(resolution=64)  # the quality scores do not depend on the views
    ev = evaluate_meshes(list(paths), file_names(list(paths)), meshes, embedder, small)
    row = ev.rows["a red cube"]
    m = meshes[0]
    want = mesh_quality("a red cube", m.verts, m.faces, m.colors).as_dict()
    for key in ("chamfer", "color_error", "silhouette_iou"):
        assert row[key] == want[key]
    # the GLB's 8-bit colours are the only colour error: round(255 c) / 255 - c
    c = torch.tensor([0.9, 0.1, 0.1])
    assert row["color_error"] == pytest.approx(
        float(((c * 255).round() / 255 - c).norm()), abs=1e-6
    )
    assert row["chamfer"] < 0.01 and row["silhouette_iou"] > 0.95
    assert "chamfer" not in ev.rows["a red box"]
    assert ev.mean["n_oracle"] == 1 and ev.mean["chamfer"] == row["chamfer"]


def _fields(m: Mesh):
    return m.verts, m.faces, m.colors


def test_glb_and_ply_load_back_in_the_world_frame(tmp_path):
    gen = torch.Generator().manual_seed(0)
    verts = torch.rand(5, 3, generator=gen) - 0.5
    faces = torch.tensor([[0, 1, 2], [1, 3, 4], [0, 2, 4]])
    colors = torch.rand(5, 3, generator=gen)
    for suffix in (".glb", ".obj", ".ply"):
        m = load_mesh(export_mesh(verts, faces, colors, tmp_path / f"m{suffix}"))
        torch.testing.assert_close(m.verts, verts, atol=1e-6, rtol=0)
        assert torch.equal(m.faces, faces)
        torch.testing.assert_close(m.colors, mesh_from_sample(verts, faces, colors).colors)


# ---- errors -----------------------------------------------------------------------------


def test_clip_folder_errors_name_the_folder(tmp_path, capsys, clip_tokenizer):
    meshes = tmp_path / "meshes"
    write_meshes(meshes, ["a red box"])
    pfile = prompt_file(tmp_path / "p.txt", ["a red box"])
    args = ("--meshes", meshes, "--prompts", pfile, "--out", tmp_path / "out")
    status, _, err = run_eval(capsys, *args, "--clip", tmp_path / "nowhere")
    assert status == 2 and f"--clip {tmp_path / 'nowhere'}: no such folder" in err
    partial = write_clip(tmp_path / "clip", clip_tokenizer)
    (partial / "preprocessor_config.json").unlink()
    status, _, err = run_eval(capsys, *args, "--clip", partial)
    assert status == 2 and str(partial) in err and "preprocessor_config.json" in err
    assert not (tmp_path / "out").exists()


def test_prompt_file_errors_name_the_file(tmp_path, capsys):
    args = ("--meshes", tmp_path, "--clip", tmp_path / "clip", "--out", tmp_path / "out")
    empty = prompt_file(tmp_path / "empty.txt", ["", "  "])
    status, _, err = run_eval(capsys, "--prompts", empty, *args)
    assert status == 2 and f"--prompts {empty} holds no prompts" in err
    twice = prompt_file(tmp_path / "twice.txt", ["a red box", "a blue box", "a red box"])
    status, _, err = run_eval(capsys, "--prompts", twice, *args)
    assert status == 2 and str(twice) in err and "'a red box' is listed twice" in err
    status, _, err = run_eval(capsys, "--prompts", tmp_path / "none.txt", *args)
    assert status == 2 and f"--prompts {tmp_path / 'none.txt'}: no such file" in err


# ---- during training --------------------------------------------------------------------

EVAL_PROMPTS = ["a red cube", "a blue torus"]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, clip_tokenizer):
    """A 2-step tiny run scoring two oracle prompts at every step."""
    from test_train import tiny_cfg

    import prd.train as train_mod

    root = tmp_path_factory.mktemp("evaluated_run")
    clip = write_clip(root / "clip", clip_tokenizer, seed=3)
    cfg = tiny_cfg(
        "train.steps=2",
        "train.eval_every=1",
        f"train.eval_clip={clip}",
        "train.eval_prompts=[" + ",".join(f"'{p}'" for p in EVAL_PROMPTS) + "]",
        "sample.grid=24",
    )
    train_mod.train(cfg, root / "run")
    return root / "run", clip


def test_training_logs_the_scores_every_eval_step(evaluated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from prd import checkpoint

    run_dir, _ = evaluated_run
    records = checkpoint.read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        ev = r["eval"]
        assert list(ev["prompts"]) == EVAL_PROMPTS and ev["n_scored"] == 2
        assert 0 <= ev["clip_score"] <= 250 and 0 <= ev["r_at_1"] <= 1
        assert ev["r_at_1"] * 8 == round(ev["r_at_1"] * 8)  # a share of 8 views
        for row in ev["prompts"].values():
            assert {"clip_score", "r_at_1", "chamfer", "color_error", "silhouette_iou"} <= set(row)
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0}).Reload()
    for key in ("clip_score", "r_at_1", "chamfer"):
        events = acc.Scalars(f"eval/{key}")
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r["eval"][key] for r in records])
    assert "eval_views/a-red-cube" in acc.Tags()["images"]


def test_prd_eval_of_the_run_repeats_its_last_training_scores(evaluated_run, capsys, tmp_path):
    """``prd eval --ckpt`` samples the exported step-2 weights, writes GLBs and scores
    them: the same numbers the run logged at step 2 (same seed, same views)."""
    from prd import checkpoint

    run_dir, clip = evaluated_run
    out = tmp_path / "out"
    pfile = prompt_file(tmp_path / "p.txt", EVAL_PROMPTS)
    status, _, err = run_eval(
        capsys, "--ckpt", run_dir, "--prompts", pfile, "--clip", clip, "--out", out
    )
    assert status == 0, err
    assert sorted(p.name for p in (out / "meshes").iterdir()) == [
        "a-blue-torus.glb",
        "a-red-cube.glb",
    ]
    doc = json.loads((out / "scores.json").read_text())
    logged = checkpoint.read_metrics(run_dir)[-1]["eval"]
    for prompt in EVAL_PROMPTS:
        got, want = doc["prompts"][prompt], logged["prompts"][prompt]
        for key in ("clip_score", "r_at_1", "chamfer", "color_error", "silhouette_iou"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (prompt, key)
    assert doc["source"]["ckpt"] == str(run_dir)


def test_eval_config_errors_name_the_key(tmp_path):
    from test_train import tiny_cfg

    import prd.train as train_mod

    with pytest.raises(ValueError, match="train.eval_every >= 1 needs train.eval_prompts"):
        tiny_cfg("train.eval_every=1", "train.eval_prompts=['a red cube']")
    with pytest.raises(ValueError, match="train.eval_prompts must be distinct"):
        tiny_cfg("train.eval_prompts=['a red cube','a red cube']")
    cfg = tiny_cfg(
        "train.eval_every=1",
        "train.eval_prompts=['a red cube']",
        f"train.eval_clip={tmp_path / 'no_clip'}",
    )
    with pytest.raises(FileNotFoundError, match=f"train.eval_clip {tmp_path / 'no_clip'}: no such"):
        train_mod.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # failed before the run started


def test_ckpt_without_weights_names_the_expected_file(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    pfile = prompt_file(tmp_path / "p.txt", ["a red box"])
    status, _, err = run_eval(
        capsys, "--ckpt", tmp_path / "run", "--prompts", pfile, "--clip", tmp_path / "clip",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert status == 2 and str(tmp_path / "run" / "export" / "latest.safetensors") in err


def test_no_mesh_loads_gives_null_means_and_every_error(tmp_path, clip_tokenizer):
    embedder = ClipEmbedder(write_clip(tmp_path / "clip", clip_tokenizer))
    errors = [ValueError("first.glb: broken"), ValueError("second.glb: missing")]
    ev = evaluate_meshes(["a", "b"], ["a", "b"], errors, embedder, ViewProtocol())
    assert ev.failed == {"a": "first.glb: broken", "b": "second.glb: missing"}
    assert ev.mean == {"clip_score": None, "r_at_1": None, "n_prompts": 2, "n_scored": 0}
