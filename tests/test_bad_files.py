"""Damaged input files, tried as a new user would: every loader names the file (and line)
and ``prd`` exits 2 without overwriting anything already written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prd import checkpoint, cli
from prd.config import load
from prd.configio import to_yaml
from prd.model import build_model
from prd.weights import save_weights

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny.yaml")


def prd(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main([str(a) for a in args])
    return status, capsys.readouterr().err


def existing(path: Path, text: str = "written before") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder with an exported weights file of the tiny config."""
    cfg = load([TINY])
    run_dir = tmp_path_factory.mktemp("bad") / "run"
    save_weights(build_model(cfg, seed=0), cfg, run_dir, step=1)
    return run_dir


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_weights_file_given_to_sample(capsys, tmp_path, run_dir, damage):
    weights = tmp_path / "latest.safetensors"
    data = checkpoint.export_path(run_dir).read_bytes()
    bad = {"truncated": data[: len(data) // 2], "garbage": b"\x00\x01junk" * 9, "empty": b""}
    weights.write_bytes(bad[damage])
    out = existing(tmp_path / "out" / "a-red-cube.glb")
    status, err = prd(capsys, "sample", "--ckpt", weights, "--prompt", "a red cube", "--out", out)
    assert status == 2
    assert f"{weights}: not a readable safetensors file" in err and "Traceback" not in err
    assert out.read_text() == "written before"


def test_undecodable_prompts_file_names_file_and_line(capsys, tmp_path, run_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red cube\n\na blue sph\xe8re\n".encode("latin-1"))
    out = existing(tmp_path / "meshes" / "a-red-cube.glb")
    status, err = prd(
        capsys, "sample", "--ckpt", run_dir, "--prompts-file", prompts, "--out", out.parent
    )
    assert status == 2 and f"{prompts}:3: bytes that are not UTF-8" in err and "xe8" in err
    assert out.read_text() == "written before"
    # prd train reads prompts.file before anything is written
    train_dir = tmp_path / "train"
    cfg_file = existing(train_dir / "config.yaml")
    status, err = prd(
        capsys, "train", "--config", TINY, "--out", train_dir, f"prompts.file={prompts}"
    )
    assert status == 2 and f"prompts.file {prompts}:3: bytes that are not UTF-8" in err
    assert cfg_file.read_text() == "written before"


def test_no_whole_checkpoint_to_resume_from(capsys, tmp_path):
    """Every checkpoint of the run damaged: --resume and --resume auto exit 2 naming the
    files; config.yaml and the checkpoint folders stay as they were."""
    cfg = load([TINY], [f"prompts.file={REPO / 'configs' / 'oracle_train_prompts.txt'}"])
    run = tmp_path / "run"
    cfg_file = existing(run / "config.yaml", to_yaml(cfg))
    for step in (1, 2):
        tag = run / checkpoint.CKPT_DIR / checkpoint.tag_for(step)
        existing(tag / "trainer_rank0.pt", "x" * 10)
        checkpoint.write_manifest(tag, step, world_size=1)
        existing(tag / "trainer_rank0.pt", "x" * 4)  # cut short after the manifest
    (run / checkpoint.CKPT_DIR / checkpoint.tag_for(1) / checkpoint.MANIFEST).write_text("{")
    checkpoint.write_atomic(run / checkpoint.CKPT_DIR / "latest", checkpoint.tag_for(2))
    args = ["train", "--config", TINY, "--out", run, f"prompts.file={cfg.prompts.file}"]
    for resume in (["--resume"], ["--resume", "auto"]):
        status, err = prd(capsys, *args, *resume)
        assert status == 2 and "no whole checkpoint" in err, err
        assert "step_00000002/trainer_rank0.pt: 4 bytes, the manifest says 10" in err
        assert "step_00000001/manifest.json: missing or unreadable" in err
    assert cfg_file.read_text() == to_yaml(cfg)
    assert sorted(p.name for p in (run / checkpoint.CKPT_DIR).iterdir()) == [
        "latest",
        "step_00000001",
        "step_00000002",
    ]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A diffusers-format tiny SD folder (what student.pretrained and teachers load)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from prd.arch import TINY_TEXT, TINY_UNET, TINY_VAE, sd_scheduler
    from prompts.tokenizer import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(**TINY_UNET).save_pretrained(folder / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
    build_clip_tokenizer().save_pretrained(folder / "tokenizer")
    sd_scheduler().save_pretrained(folder / "scheduler")
    return folder


@pytest.mark.parametrize(
    "name",
    [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "vae/config.json",
    ],
)
def test_damaged_pretrained_weights_folder(capsys, tmp_path, base_folder, name):
    import shutil

    folder = tmp_path / "base"
    shutil.copytree(base_folder, folder)
    victim = folder / name
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    out = existing(tmp_path / "a-red-cube.glb")
    status, err = prd(
        capsys, "sample", "--config", TINY, "--prompt", "a red cube", "--out", out,
        "student.arch=tiny", f"student.pretrained={folder}",
    )  # fmt: skip
    assert status == 2 and str(victim) in err, err
    assert out.read_text() == "written before"


def test_damaged_curated_prompt_folder(capsys, tmp_path):
    """A truncated shard, then a manifest that is not JSON: the stream and prd train name
    the file and exit 2; the run folder stays as it was."""
    from prompts.config import CurateConfig
    from prompts.curate import curate
    from prompts.stream import PromptStream

    (tmp_path / "p.txt").write_text("".join(f"a red cube number {i}\n" for i in range(40)))
    cfg = CurateConfig(shards=2, near_dedup=False, tokenizer_cache=str(tmp_path / "tok"))
    folder = tmp_path / "curated"
    curate([tmp_path / "p.txt"], folder, cfg)
    PromptStream(folder, 2)  # whole: reads fine
    (shard, *_) = sorted(folder.rglob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(ValueError, match=f"{shard}: contents differ from the sha256"):
        PromptStream(folder, 2)
    run = tmp_path / "run"
    cfg_file = existing(run / "config.yaml")
    oracle = ["--config", REPO / "configs/oracle.yaml", "--out", run, "prompts.file=null"]
    status, err = prd(capsys, "train", *oracle, f"prompts.source={folder}")
    assert status == 2 and f"{shard}: contents differ" in err
    (folder / "manifest.json").write_text('{"format": ')
    status, err = prd(capsys, "train", *oracle, f"prompts.source={folder}")
    assert status == 2 and f"{folder / 'manifest.json'}: not a readable manifest" in err
    assert cfg_file.read_text() == "written before"


def test_damaged_teacher_files(capsys, tmp_path, base_folder):
    """The SD teacher's folder and an original MVDream / ND-MV checkpoint cut short: the
    loaders name the file; `prd convert` exits 2 and writes no folder."""
    import shutil

    from teachers import multiview_unet, sd

    folder = tmp_path / "sd"
    shutil.copytree(base_folder, folder)
    victim = folder / "unet" / "diffusion_pytorch_model.safetensors"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(ValueError, match=str(victim)):
        sd.load_pretrained(folder)
    ckpt = tmp_path / "mvdream.ckpt"
    torch.save({"model.diffusion_model.x.weight": torch.zeros(64, 64)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{ckpt}: not a readable torch checkpoint"):
        multiview_unet.unet_state_dict(ckpt)
    out = tmp_path / "converted"
    status, err = prd(capsys, "convert", "mvdream", ckpt, "--out", out)
    assert status == 2 and f"{ckpt}: not a readable torch checkpoint" in err
    assert not out.exists() and not out.with_name("converted.partial").exists()
