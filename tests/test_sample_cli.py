"""``prd sample`` on the tiny config: mesh files, determinism, checkpoints, errors, DDIM."""

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh
from diffusers import DDIMScheduler

from prd import cli
from prd.config import load
from prd.export import WORLD_TO_GLTF
from prd.model import build_model
from prd.sample import generate, generate_batch
from prd.triplane import TriplaneField
from prd.weights import save_weights

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny.yaml")
GRID = 24  # marching-cubes grid of these tests (the preset's 64 is slower, same code)
STAGES = {
    "text_encode",
    *(f"unet_step_{k}" for k in range(1, 5)),
    "vae_decode",
    "grid_eval",
    "marching_cubes",
    "vertex_colors",
    "export",
}


@pytest.fixture(scope="module")
def cfg():
    return load([TINY], [f"sample.grid={GRID}"])


@pytest.fixture(scope="module")
def model(cfg):
    """The model prd sample builds for the tiny config (seeded with train.seed)."""
    return build_model(cfg, seed=cfg.train.seed).eval()


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main(["sample", *args])
    out, err = capsys.readouterr()
    return status, out, err


def sample_tiny(capsys, out: Path, *extra: str, seed: int = 0) -> tuple[int, str, str]:
    return run(
        capsys,
        "--config", TINY, "--prompt", "a red cube", "--out", str(out), "--seed", str(seed),
        f"sample.grid={GRID}", *extra,
    )  # fmt: skip


def load_glb(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World-frame vertices (V, 3), faces (F, 3), RGBA uint8 colours (V, 4) of a GLB."""
    mesh = trimesh.load(path, force="mesh", process=False)
    assert mesh.visual.kind == "vertex"
    verts = np.asarray(mesh.vertices) @ WORLD_TO_GLTF  # file rows are R @ p: p = R^T v
    return verts, np.asarray(mesh.faces), np.asarray(mesh.visual.vertex_colors)


def test_glb_reloads_with_the_fields_vertex_colours(capsys, tmp_path, cfg, model):
    status, out, err = sample_tiny(capsys, tmp_path / "cube.glb", seed=3)
    assert status == 0, err
    assert "cube.glb" in out and "faces" in out
    verts, faces, rgba = load_glb(tmp_path / "cube.glb")
    assert len(faces) > 100 and faces.max() < len(verts)
    assert rgba.dtype == np.uint8 and (rgba[:, 3] == 255).all()
    # the same mesh as sampling the same model in-process with the same seed
    ref = generate(model, "a red cube", cfg.sample, seed=3)
    np.testing.assert_allclose(verts, ref.verts.numpy(), atol=1e-6)
    np.testing.assert_array_equal(faces, ref.faces.numpy())
    # colours: the field's albedo at the reloaded vertices, within uint8 rounding
    with torch.no_grad():
        albedo = ref.field.color(torch.from_numpy(verts).float()[None])[0].numpy()
    assert np.abs(albedo * 255.0 - rgba[:, :3]).max() <= 0.5 + 1e-3
    assert np.ptp(rgba[:, :3]) > 0  # not a constant placeholder colour


def test_same_seed_same_mesh_other_seed_other_mesh(capsys, tmp_path):
    for name, seed in (("a.glb", 5), ("b.glb", 5), ("c.glb", 6)):
        status, _, err = sample_tiny(capsys, tmp_path / name, seed=seed)
        assert status == 0, err
    a, b, c = (load_glb(tmp_path / n) for n in ("a.glb", "b.glb", "c.glb"))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape != c[0].shape or not np.allclose(a[0], c[0], atol=1e-4)


def test_prompts_file_writes_one_file_per_slug_and_json_lines(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A red cube!\n\n  a blue   ball \na red cube\n")
    out = tmp_path / "meshes"
    status, stdout, err = run(
        capsys, "--config", TINY, "--prompts-file", str(prompts), "--out", str(out), "--json",
        "sample.grid=16",
    )  # fmt: skip
    assert status == 0, err
    names = {"a-red-cube.glb", "a-blue-ball.glb", "a-red-cube-2.glb"}  # no overwrite
    assert {p.name for p in out.iterdir()} == names
    lines = stdout.strip().splitlines()
    assert len(lines) == 3
    reports = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in reports] == ["A red cube!", "a blue   ball", "a red cube"]
    for r in reports:
        assert set(r["seconds"]) == STAGES
        assert all(v >= 0 for v in r["seconds"].values())
        assert r["total_seconds"] == pytest.approx(sum(r["seconds"].values()), abs=1e-3)
        assert Path(r["out"]).name in names and r["faces"] > 0
        _, faces, _ = load_glb(Path(r["out"]))
        assert len(faces) == r["faces"]


def test_empty_surface_exits_2_without_a_file(capsys, tmp_path, monkeypatch):
    # an SDF positive everywhere: no zero crossing on any grid
    monkeypatch.setattr(TriplaneField, "_sdf", lambda self, feats, p: p.norm(dim=-1) + 1.0)
    status, stdout, err = sample_tiny(capsys, tmp_path / "empty.glb")
    assert status == 2
    assert "no zero crossing" in err and "a red cube" in err and "Traceback" not in err
    assert not (tmp_path / "empty.glb").exists()
    assert stdout == ""


def test_ckpt_missing_run_folder_names_the_expected_file(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    status, _, err = run(capsys, "--ckpt", str(run_dir), "--prompt", "x", "--out", "x.glb")
    assert status == 2
    assert err.startswith("prd sample: error:")
    assert str(run_dir / "export" / "latest.safetensors") in err


def test_ckpt_loads_exported_weights(capsys, tmp_path, cfg, model):
    # a run whose config names a prompt file that is gone by sampling time
    prompts = tmp_path / "train_prompts.txt"
    prompts.write_text("a red cube\n")
    run_cfg = load([TINY], [f"sample.grid={GRID}", f"prompts.file={prompts}"])
    trained = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    run_dir = tmp_path / "run"
    save_weights(trained, run_cfg, run_dir, step=7)
    prompts.unlink()

    status, _, err = run(
        capsys, "--ckpt", str(run_dir), "--prompt", "a red cube", "--out", str(tmp_path / "t.glb")
    )
    assert status == 0, err
    verts, faces, rgba = load_glb(tmp_path / "t.glb")
    want = generate(trained, "a red cube", cfg.sample, seed=0)
    np.testing.assert_allclose(verts, want.verts.numpy(), atol=1e-6)
    np.testing.assert_array_equal(faces, want.faces.numpy())
    np.testing.assert_array_equal(rgba[:, :3], np.round(want.colors.numpy() * 255))
    initial = generate(model, "a red cube", cfg.sample, seed=0)
    assert initial.verts.shape != want.verts.shape or not torch.allclose(
        initial.verts, want.verts, atol=1e-4
    )


def test_ddim_update_matches_diffusers(cfg, model, monkeypatch):
    """The sampler's K deterministic steps equal diffusers' DDIMScheduler (eta 0) for a
    stand-in eps model, at timesteps 999/749/499/249."""
    student = model.student

    def eps_model(z, t, encoder_hidden_states):
        tt = t.float().view(-1, 1, 1, 1)
        return SimpleNamespace(sample=0.6 * z * torch.cos(tt / 300) + 0.2 * torch.sin(3 * z))

    seen_z, seen_x0 = [], []
    predict = student.predict_x0

    def recording_predict(z, t, text):
        seen_z.append(z.clone())
        x0 = predict(z, t, text)
        seen_x0.append(x0.clone())
        return x0

    monkeypatch.setattr(student.unet, "forward", eps_model)
    monkeypatch.setattr(student, "predict_x0", recording_predict)
    generate(model, "a red cube", cfg.sample, seed=11)

    sched = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
        prediction_type="epsilon",
    )  # fmt: skip
    torch.testing.assert_close(sched.alphas_cumprod, student.alphas_cumprod)
    sched.set_timesteps(4)
    sched.timesteps = torch.tensor([999, 749, 499, 249])
    size = student.cfg.resolved_latent_size()
    z = torch.randn(6, 4, size, size, generator=torch.Generator().manual_seed(11))
    assert len(seen_z) == 4
    for k, t in enumerate(sched.timesteps):
        torch.testing.assert_close(seen_z[k], z, rtol=1e-5, atol=1e-5)
        step = sched.step(eps_model(z, t.expand(6), None).sample, t, z, eta=0.0)
        torch.testing.assert_close(seen_x0[k], step.pred_original_sample, rtol=1e-5, atol=1e-5)
        z = step.prev_sample
    # after t=249 DDIM steps to alpha_bar = 1: its sample is the last x0 the student decodes
    torch.testing.assert_close(seen_x0[-1], z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--device", "nosuchdevice"], "nosuchdevice"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else [], "cuda"),
        (["--out", "{tmp}/a_file/x.glb"], "a_file"),
        (["--out", "{tmp}/x.stl"], "x.stl"),
        (["--texture", "--out", "{tmp}/x.ply"], ".glb"),
        (["student.lora_rnk=3"], "student.lora_rnk"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_user_errors_exit_2_naming_the_value(capsys, tmp_path, args, named):
    (tmp_path / "a_file").write_text("not a folder")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["--config", TINY, "--prompt", "x", "--out", str(tmp_path / "ok.glb")]
    status, _, err = run(capsys, *base, *args)
    assert status == 2, err
    assert err.startswith("prd sample: error:") and named in err
    assert not (tmp_path / "ok.glb").exists()


def test_missing_prompts_file_and_pretrained_folder(capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    args = ["--config", TINY, "--prompts-file", str(missing), "--out", str(tmp_path)]
    status, _, err = run(capsys, *args)
    assert status == 2 and str(missing) in err
    sd21 = str(REPO / "configs/sd21.yaml")
    args = ["--config", sd21, "--prompt", "x", "--out", str(tmp_path / "x.glb")]
    status, _, err = run(capsys, *args, "student.pretrained=/nonexistent")
    assert status == 2 and "/nonexistent" in err and "unet/config.json" in err


def test_console_help_lists_the_subcommands():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "prd", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "sample", "params", "prompts"):
        assert command in proc.stdout
    # the help needs no subcommand module: torch and diffusers are not imported
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()}
    assert "torch" not in imported and "diffusers" not in imported and "prd.sample" not in imported


def test_max_faces_reports_the_written_mesh_and_the_extracted_one(capsys, tmp_path):
    status, stdout, err = sample_tiny(capsys, tmp_path / "full.glb", "--json")
    assert status == 0, err
    full = json.loads(stdout)
    budget = full["faces"] // 3
    status, stdout, err = sample_tiny(capsys, tmp_path / "s.glb", "--json", "--max-faces",
                                      str(budget))  # fmt: skip
    assert status == 0, err
    r = json.loads(stdout)
    assert r["faces_extracted"] == full["faces"] and 0 < r["faces"] <= budget
    _, faces, _ = load_glb(tmp_path / "s.glb")
    assert len(faces) == r["faces"]
    assert set(r["seconds"]) == STAGES | {"simplify"}


@pytest.mark.parametrize("renoise", ["ddim", "fresh"])
def test_a_batch_gives_the_meshes_of_one_by_one(cfg, model, renoise):
    """Three prompts through the networks at once (18 planes per UNet pass, one decode and
    grid) give each prompt the mesh it gets alone: same faces, vertices and colours up to
    the rounding of batched kernels."""
    sample_cfg = dataclasses.replace(cfg.sample, renoise=renoise)
    prompts = ["a red cube", "a blue ball", "a red cube"]
    batch = generate_batch(model, prompts, sample_cfg, seed=4)
    assert [s.prompt for s in batch] == prompts
    for got in batch:
        ref = generate(model, got.prompt, sample_cfg, seed=4)
        np.testing.assert_array_equal(got.faces.numpy(), ref.faces.numpy())
        torch.testing.assert_close(got.verts, ref.verts, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.colors, ref.colors, rtol=0, atol=1e-5)
    # the same prompt twice in one batch: the same mesh; another prompt: another mesh
    torch.testing.assert_close(batch[0].verts, batch[2].verts, rtol=0, atol=1e-5)
    assert batch[1].verts.shape != batch[0].verts.shape or not torch.allclose(
        batch[1].verts, batch[0].verts, atol=1e-4
    )


def test_batch_size_on_the_command_line_writes_the_same_files(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na green cone\n")
    for bs in ("1", "2"):
        status, out, err = run(
            capsys, "--config", TINY, "--prompts-file", str(prompts), "--out",
            str(tmp_path / bs), "--json", "--batch-size", bs, f"sample.grid={GRID}",
        )  # fmt: skip
        assert status == 0, err
        sizes = [json.loads(line)["batch_size"] for line in out.strip().splitlines()]
        assert sizes == ([1, 1, 1] if bs == "1" else [2, 2, 1])
    for name in ("a-red-cube.glb", "a-blue-ball.glb", "a-green-cone.glb"):
        one, two = load_glb(tmp_path / "1" / name), load_glb(tmp_path / "2" / name)
        np.testing.assert_array_equal(one[1], two[1])
        np.testing.assert_allclose(one[0], two[0], rtol=0, atol=1e-5)
        assert np.abs(one[2].astype(int) - two[2].astype(int)).max() <= 1  # uint8 rounding
