"""Exported weights (``prd.weights``): an exact round trip, and loud failures that name the
key or header field at fault."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prd.config import load
from prd.model import build_model
from prd.weights import load_weights, save_weights

TINY = ["configs/tiny.yaml"]
KEY = "student.unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A"


@pytest.fixture(scope="module")
def cfg():
    return load(TINY)


@pytest.fixture(scope="module")
def saved(cfg, tmp_path_factory, randomize_trainable):
    model = randomize_trainable(build_model(cfg, seed=cfg.train.seed), seed=7)
    return model, save_weights(model, cfg, tmp_path_factory.mktemp("run"), step=3)


def _rewrite(src, dst, edit_tensors=None, edit_meta=None):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)


def test_round_trip_is_exact(cfg, saved):
    src, path = saved
    dst = build_model(cfg, seed=cfg.train.seed)  # same base weights, fresh adapters
    load_weights(dst, path)
    want = {n: p for n, p in src.named_parameters() if p.requires_grad}
    got = {n: p for n, p in dst.named_parameters() if p.requires_grad}
    assert want.keys() == got.keys() and any(k.startswith("decoder.") for k in got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    z, t = torch.randn(6, 4, 8, 8), torch.full((6,), 300)
    text = torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(src(z, t, text)[1], dst(z, t, text)[1])


@pytest.mark.parametrize(
    "edit_tensors, edit_meta, error, match",
    [
        (lambda t: t.pop(KEY), None, KeyError, r"missing keys \['student\.unet\.down_blocks"),
        (lambda t: t.update({"x.lora_A": torch.zeros(1)}), None, KeyError,
         r"unexpected keys \['x\.lora_A'\]"),
        (lambda t: t.update({KEY: t[KEY][:, :2].clone()}), None, ValueError,
         "shape mismatch.*attn1.to_q.lora_A"),
        (None, lambda m: m.update({"student.arch": "sd21"}), ValueError,
         "metadata student.arch='sd21', model has 'tiny'"),
        (None, lambda m: m.update({"student.lora_rank": "8"}), ValueError, "lora_rank"),
        (None, lambda m: m.update(field="[8, 64]"), ValueError, "metadata field="),
        (None, lambda m: m.update(format="other"), ValueError, "metadata format='other'"),
    ],
)  # fmt: skip
def test_bad_file_fails_naming_what_differs(saved, tmp_path, edit_tensors, edit_meta, error, match):
    model, path = saved
    bad = tmp_path / "bad.safetensors"
    _rewrite(path, bad, edit_tensors, edit_meta)
    with pytest.raises(error, match=match):
        load_weights(model, bad)


def test_other_base_weights_and_unreadable_files_fail(cfg, saved, tmp_path):
    _, path = saved
    with pytest.raises(ValueError, match="other base weights"):
        load_weights(build_model(cfg, seed=cfg.train.seed + 1), path)
    model = build_model(cfg, seed=cfg.train.seed)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_weights(model, tmp_path / "none.safetensors")
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_weights(model, tmp_path / "torn.safetensors")
