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
NEW_CONV_OUT = 128 * 64 * 9 + 64  # the decoder's new conv_out, 128 -> 64 channels, 3x3


def resnet_convs(c_in: int, c_out: int) -> list[tuple[int, int, int]]:
    """(in, out, kernel) of a ResNet block's convs: two 3x3, a 1x1 shortcut if widths differ."""
    return [(c_in, c_out, 3), (c_out, c_out, 3)] + ([(c_in, c_out, 1)] if c_in != c_out else [])


def sd21_unet_convs() -> list[tuple[int, int, int]]:
    """SD 2.1-base UNet convs but conv_in / conv_out: 2 ResNets per down level (320, 640,
    1280, 1280) with a downsampler on the first three, 2 in the middle, 3 per up level whose
    inputs concatenate the skips, with an upsampler on the first three."""
    convs = []
    for c_in, c_out, down in [(320, 320, 1), (320, 640, 1), (640, 1280, 1), (1280, 1280, 0)]:
        convs += resnet_convs(c_in, c_out) + resnet_convs(c_out, c_out) + [(c_out, c_out, 3)] * down
    convs += resnet_convs(1280, 1280) * 2
    ups = [(1280, (2560, 2560, 2560), 1), (1280, (2560, 2560, 1920), 1)]
    ups += [(640, (1920, 1280, 960), 1), (320, (960, 640, 640), 0)]
    for c_out, inputs, up in ups:
        convs += [c for c_in in inputs for c in resnet_convs(c_in, c_out)] + [
            (c_out, c_out, 3)
        ] * up
    return convs


def sd21_decoder_convs() -> list[tuple[int, int, int]]:
    """The SD VAE decoder's convs but conv_in / conv_out: 2 mid ResNets at 512, then 3 per
    up level (512, 512, 256, 128) with an upsampler on the first three."""
    convs = resnet_convs(512, 512) * 2
    for c_in, c_out, up in [(512, 512, 1), (512, 512, 1), (512, 256, 1), (256, 128, 0)]:
        convs += resnet_convs(c_in, c_out) + resnet_convs(c_out, c_out) * 2
        convs += [(c_out, c_out, 3)] * up
    return convs


def locon(convs, rank: int) -> int:
    """LoCon of rank r on Conv2d(a, b, k): a k x k conv a -> r and a 1x1 conv r -> b."""
    return sum(rank * (c_in * k * k + c_out) for c_in, c_out, k in convs)


def trainable_by_hand(rank: int) -> int:
    """Every PETA adapter of the paper's student at ``rank``, plus the new conv_out."""
    width = sum(ATTN_WIDTHS)
    plane = PLANES * 4 * rank * 2 * width  # per-plane self-attention q, k, v, out
    cross = sum(2 * rank * 2 * d + 2 * rank * (TEXT_DIM + d) for d in ATTN_WIDTHS)
    vae_attn = 4 * rank * 2 * 512
    convs = locon(sd21_unet_convs(), rank) + locon(sd21_decoder_convs(), rank)
    return plane + cross + vae_attn + convs + NEW_CONV_OUT


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

    # 64 UNet and 33 decoder convs carry LoCon (the reference's counts); 22.66M in all
    assert (len(sd21_unet_convs()), len(sd21_decoder_convs())) == (64, 33)
    assert report["trainable"] == trainable_by_hand(RANK)
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
    assert groups["new_conv_out"] == NEW_CONV_OUT
    assert groups["unet_conv_lora"] == locon(sd21_unet_convs(), RANK)
    assert groups["vae_conv_lora"] == locon(sd21_decoder_convs(), RANK)
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
    assert half["trainable"] == trainable_by_hand(8)


def test_params_rejects_bad_keys(capsys):
    sd21 = str(REPO / "configs/sd21.yaml")
    assert cli.main(["params", "--config", sd21, "student.lora_rnak=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prd params: error:") and "student.lora_rnak" in err
