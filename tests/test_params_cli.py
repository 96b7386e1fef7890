"""``prd params``: parameter counts of the full SD 2.1 student on the meta device."""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from prd import cli
from prd.arch import SD21_UNET, SD21_VAE

REPO = Path(__file__).resolve().parents[1]

# Hidden widths of SD 2.1-base's 16 transformer blocks: 2 per down level (320, 640, 1280),
# 1 in the middle (1280), 3 per up level (1280, 640, 320).
ATTN_WIDTHS = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
RANK, TEXT_DIM, PLANES = 16, 1024, 6


def rss_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_params_sd21_counts_without_allocating(capsys):
    capsys.readouterr()
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    # a pretrained folder is not read: counts come from the in-code arch
    sd21 = str(REPO / "configs/sd21.yaml")
    status = cli.main(["params", "--config", sd21, "student.pretrained=/nonexistent"])
    growth_mib = (rss_kib("VmHWM") - before) / 1024
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    # real weights would take 4 x 1.26e9 bytes: nothing of that size was touched
    assert growth_mib < 300, f"prd params grew the process by {growth_mib:.0f} MiB"
    print(f"peak RSS growth {growth_mib:.0f} MiB")

    assert report["trainable"] == 22_661_184
    assert report["field_mlps"] == (32 * 64 + 64 * 64 + 64) + (96 * 64 + 64 * 64 + 64 * 3) + (
        32 * 64 + 64 * 64 + 64 * 3
    )
    assert report["trainable_with_field"] == report["trainable"] + report["field_mlps"]
    assert abs(report["ratio"] - 0.0248) < 5e-4  # paper: ~2.5%
    assert report["ratio"] == report["trainable"] / report["frozen"]
    groups = report["groups"]
    assert sum(groups.values()) == report["trainable"]
    # LoRA of rank r on Linear(a, b) adds r (a + b) weights
    width = sum(ATTN_WIDTHS)
    assert groups["plane_lora"] == PLANES * 4 * RANK * 2 * width  # self-attn q, k, v, out
    cross = sum(2 * RANK * 2 * d + 2 * RANK * (TEXT_DIM + d) for d in ATTN_WIDTHS)
    assert groups["cross_attn_lora"] == cross  # q, out: d -> d; k, v: 1024 -> d
    assert groups["new_conv_out"] == 128 * 64 * 9 + 64
    assert groups["vae_attn_lora"] == 4 * RANK * 2 * 512
    assert (report["arch"], report["lora_rank"]) == ("sd21", 16)

    # frozen = the diffusers UNet + VAE decoder (and post_quant_conv) without the old conv_out
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
        vae = AutoencoderKL(**SD21_VAE)
    n_unet = sum(p.numel() for p in unet.parameters())
    assert n_unet == 865_910_724  # stable-diffusion-2-1-base UNet
    n_decoder = sum(p.numel() for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters())
    old_out = sum(p.numel() for p in vae.decoder.conv_out.parameters())
    assert report["frozen"] == n_unet + n_decoder - old_out


def test_params_rank_override_scales_the_adapters(capsys):
    capsys.readouterr()
    sd21 = str(REPO / "configs/sd21.yaml")
    assert cli.main(["params", "--config", sd21, "student.lora_rank=8"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["lora_rank"] == 8
    # every adapter is linear in the rank; the new conv_out is not an adapter
    adapters = 22_661_184 - (128 * 64 * 9 + 64)
    assert half["trainable"] == adapters // 2 + 128 * 64 * 9 + 64


def test_params_rejects_bad_keys(capsys):
    sd21 = str(REPO / "configs/sd21.yaml")
    assert cli.main(["params", "--config", sd21, "student.lora_rnak=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prd params: error:") and "student.lora_rnak" in err
