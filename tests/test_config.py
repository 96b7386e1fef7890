"""Typed run config: reference defaults, YAML overlays, dotlist overrides, errors naming keys."""

import math
from pathlib import Path

import pytest
from conftest import TINY_TRAINING

from prd.config import Config, load
from prd.configio import ConfigError, load_config, read_overlay
from prd.model import build_model

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_defaults_are_the_reference_numbers():
    cfg = load()
    assert cfg == Config()
    assert cfg.train.progressive_steps == 4 and cfg.sample.steps == 4
    assert cfg.train.lr == 2e-4 and cfg.train.optimizer == "adan"
    assert (cfg.volume.n_uniform, cfg.volume.n_importance) == (128, 64)
    assert (cfg.volume.near, cfg.volume.far, cfg.volume.inv_std) == (0.1, 4.0, 100.0)
    assert (cfg.volume.resolution, cfg.volume.patch_size, cfg.volume.global_size) == (128, 40, 42)
    assert cfg.cameras.n_views == 4 and cfg.cameras.fov_y == 60.0
    # the reference's plane rotation, colour activation, empty-mesh repair, loss reduction
    assert (cfg.field.plane_orientation, cfg.field.color_activation) == ("v1", "sigmoid_mipnerf")
    assert cfg.mesh.repair_empty
    roles = (cfg.teachers.sd, cfg.teachers.mvdream, cfg.teachers.richdreamer)
    assert {r.guidance.object_reduction for r in roles} == {"sum"}
    assert tuple(cfg.cameras.distance_range) == (1.39, 1.73)
    assert tuple(cfg.cameras.elevation_range) == (0.0, 30.0)
    assert cfg.mesh_grid == 128 and cfg.sample.grid == 160
    assert cfg.student.arch == "sd21" and cfg.student.pretrained is None
    assert (cfg.student.lora_rank, cfg.student.planes, cfg.student.triplane_channels) == (16, 6, 32)
    assert (cfg.field.channels, cfg.field.hidden, cfg.field.sphere_radius) == (32, 64, 0.5)
    assert (cfg.train.eikonal.start, cfg.train.eikonal.end, cfg.train.eikonal.steps) == (
        1.0,
        0.0,
        20000,
    )
    assert (cfg.train.volume_color_grad.start, cfg.train.volume_color_grad.end) == (1.0, 0.01)


def test_overlays_then_overrides_apply_in_order(tmp_path):
    a = write(tmp_path, "a.yaml", "student: {lora_rank: 4}\ntrain: {lr: 1.0e-3}\n")
    b = write(tmp_path, "b.yaml", "student: {lora_rank: 8, lora_alpha: 2.0}\n")
    ab = load([a, b])
    assert (ab.student.lora_rank, ab.student.lora_alpha, ab.train.lr) == (8, 2.0, 1e-3)
    ba = load([b, a])
    assert (ba.student.lora_rank, ba.student.lora_alpha) == (4, 2.0)
    # overrides come last, left to right; untouched keys keep the earlier layers' values
    cfg = load([a, b], ["student.lora_rank=2", "student.lora_rank=3", "train.steps=7"])
    assert (cfg.student.lora_rank, cfg.student.lora_alpha, cfg.train.lr) == (3, 2.0, 1e-3)
    assert cfg.train.steps == 7 and cfg.sample.grid == 160
    # a typed dotlist value is converted, not kept as a string
    assert load(None, ["train.lr=5e-4"]).train.lr == 5e-4
    assert load(None, ["cameras.distance_range=[1.0,2.0]"]).cameras.distance_range == (1.0, 2.0)


def test_extends_chain_resolves_relative_to_the_preset(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    write(tmp_path, "base.yaml", "student: {lora_rank: 4, lora_alpha: 4.0}\nmesh_grid: 64\n")
    write(sub, "mid.yaml", "extends: ../base.yaml\nstudent: {lora_rank: 8}\n")
    top = write(tmp_path, "top.yaml", "extends: sub/mid.yaml\nmesh_grid: 48\n")
    assert len(read_overlay(top)) == 3
    cfg = load([top])
    assert (cfg.student.lora_rank, cfg.student.lora_alpha, cfg.mesh_grid) == (8, 4.0, 48)


def test_extends_cycle_and_missing_base_fail(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as exc:
        load([tmp_path / "a.yaml"])
    assert "a.yaml" in str(exc.value) and "b.yaml" in str(exc.value)
    write(tmp_path, "self.yaml", "extends: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load([tmp_path / "self.yaml"])
    write(tmp_path, "orphan.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load([tmp_path / "orphan.yaml"])
    with pytest.raises(ConfigError, match="not_there.yaml"):
        load([tmp_path / "not_there.yaml"])


@pytest.mark.parametrize(
    ("yaml_text", "override", "key"),
    [
        ("bogus: 1\n", "bogus=1", "bogus"),
        ("student: {lora_rnk: 8}\n", "student.lora_rnk=8", "student.lora_rnk"),
        ("train: {eikonal: {stat: 1.0}}\n", "train.eikonal.stat=1.0", "train.eikonal.stat"),
    ],
)
def test_unknown_key_fails_with_its_dotted_name(tmp_path, yaml_text, override, key):
    path = write(tmp_path, "bad.yaml", yaml_text)
    with pytest.raises(ConfigError, match=f"'{key}'") as exc:
        load([path])
    assert str(path) in str(exc.value)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load(None, [override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("student.lora_rank=abc", "student.lora_rank"),
        ("train.lr=fast", "train.lr"),
        ("train.eikonal.start=x", "train.eikonal.start"),
        ("train.background=[1,2]", "train.background"),  # tuple of the wrong length
        ("student=3", "student"),
    ],
)
def test_wrong_type_fails_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load(None, [override])
    dotted, value = override.split("=")
    nested = value
    for part in reversed(dotted.split(".")):
        nested = f"{{{part}: {nested}}}"
    path = write(tmp_path, "bad.yaml", nested[1:-1] + "\n")
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load([path])


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.optimizer=sgd", ["train.optimizer", "sgd"]),
        ("sample.renoise=sometimes", ["sample.renoise", "sometimes"]),
        ("student.arch=sd15", ["student.arch", "sd15"]),
        ("field.channels=7", ["field.channels", "student.triplane_channels"]),  # cross-section
        ("mesh_grid=4", ["mesh_grid"]),
        ("cameras.fov_y=-5", ["cameras", "fov_y"]),  # section prefixed by the loader
        ("train.eikonal.steps=-1", ["train.eikonal", "steps"]),
        ("prompts.file=/nonexistent/prompts.txt", ["prompts.file", "/nonexistent/prompts.txt"]),
    ],
)
def test_post_init_check_fails_naming_the_field(override, names):
    with pytest.raises(ConfigError) as exc:
        load(None, [override])
    for name in names:
        assert name in str(exc.value)


def test_override_without_value_fails():
    with pytest.raises(ConfigError, match="student.lora_rank"):
        load(None, ["student.lora_rank"])


# Sizes for a first training step on CPU; every other choice of a preset (K, optimizer,
# ZeRO stage, gradient checkpointing, field, losses, cameras, ...) stays as it is.
FIRST_STEP_AT_TINY_SIZE = [
    *TINY_TRAINING,
    "student.arch=tiny",
    "student.pretrained=null",
    "student.latent_size=null",
    "volume.n_uniform=8",
    "background.log2_table_size=12",
    *(f"teachers.{role}.resolution=16" for role in ("sd", "mvdream", "richdreamer")),
    "train.steps=1",
    "train.batch_size=1",
    "train.precision=fp32",  # bf16 matmuls are ~70x slower on these CPUs
]


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_trains_its_first_step_at_tiny_size(preset, monkeypatch, tmp_path):
    """A preset that loads but cannot train fails here: its first optimizer step, at tiny
    sizes, applies a finite, non-zero gradient. Teachers that need weights (none ship with
    the repository) are replaced by the oracles of the same roles."""
    import os

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    from prd import checkpoint
    from prd.train import train

    monkeypatch.chdir(REPO)  # presets name prompt files relative to the repository
    assert preset.read_text().count("\n") <= 40  # thin overlays, not copied configs
    cfg = load([preset])
    oracle = [
        f"teachers.{role}.source=oracle"
        for role in ("sd", "mvdream", "richdreamer")
        if getattr(cfg.teachers, role).source == "pretrained"
    ]
    cfg = load([preset], [*FIRST_STEP_AT_TINY_SIZE, *oracle])
    summary = train(cfg, tmp_path / "run")
    (record,) = checkpoint.read_metrics(tmp_path / "run")
    assert summary == {"step": 1, "loss": record["loss"], "nonfinite_total": 0}
    assert all(math.isfinite(v) for v in record["losses"].values()), record["losses"]
    assert 0 < record["grad_norm"] < math.inf


def test_preset_values_reach_the_config(monkeypatch):
    monkeypatch.chdir(REPO)
    tiny = load([REPO / "configs/tiny.yaml"])
    assert (tiny.student.arch, tiny.student.lora_rank, tiny.field.channels) == ("tiny", 4, 8)
    assert tiny.sample.grid == 64 and tiny.train.lr == 2e-4  # untouched default
    oracle = load([REPO / "configs/oracle.yaml"])  # extends tiny.yaml
    assert oracle.student.arch == "tiny" and oracle.train.steps == 200
    assert oracle.cameras.fov_y == 50.0 and oracle.mesh.grad_scale == 0.03
    # the oracle run keeps the settings it was measured with where the reference differs
    assert (oracle.field.plane_orientation, oracle.field.color_activation) == ("fixed", "sigmoid")
    assert not oracle.mesh.repair_empty
    roles = (oracle.teachers.sd, oracle.teachers.mvdream, oracle.teachers.richdreamer)
    assert {r.guidance.object_reduction for r in roles} == {"mean"}
    sd21 = load([REPO / "configs/sd21.yaml"])
    assert (sd21.student.arch, sd21.student.lora_rank, sd21.sample.grid) == ("sd21", 16, 160)


def test_missing_pretrained_folder_fails_at_build_naming_path_and_files():
    cfg = load([REPO / "configs/sd21.yaml"], ["student.pretrained=/nonexistent/sd21-base"])
    with pytest.raises(FileNotFoundError) as exc:
        build_model(cfg)
    msg = str(exc.value)
    assert "/nonexistent/sd21-base" in msg
    for expected in ("unet/diffusion_pytorch_model.safetensors", "vae/config.json", "tokenizer"):
        assert expected in msg


def test_missing_tiny_base_names_the_command_that_builds_it(tmp_path):
    cfg = load([REPO / "configs/oracle.yaml"], [f"student.pretrained={tmp_path / 'base'}"])
    with pytest.raises(FileNotFoundError, match=f"prd tiny-base --out {tmp_path / 'base'}"):
        build_model(cfg)


def test_incomplete_pretrained_folder_names_the_missing_files(tmp_path):
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    cfg = load([REPO / "configs/sd21.yaml"], [f"student.pretrained={tmp_path}"])
    with pytest.raises(FileNotFoundError) as exc:
        build_model(cfg)
    missing = str(exc.value).split("missing")[1].split(";")[0]
    assert "vae/config.json" in missing and "text_encoder/model.safetensors" in missing
    assert "unet/config.json" not in missing


def test_load_config_on_another_schema(tmp_path):
    from prd.triplane import FieldConfig

    path = write(tmp_path, "f.yaml", "hidden: 16\n")
    assert load_config(FieldConfig, [path], ["bound=2.0"]) == FieldConfig(hidden=16, bound=2.0)
