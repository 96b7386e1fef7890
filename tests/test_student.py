"""The student: schedule, text routing, decode layout, counts, loading a base."""

import os

import pytest
import torch

from prd.student import StudentConfig, build_student, count_parameters

P, C = 6, 32


def _student(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_student(StudentConfig(arch="tiny", **kw))


@pytest.fixture(scope="module")
def student():
    return _student()


def test_config_checks_name_the_bad_value():
    with pytest.raises(ValueError, match="student.arch.*'sd15'"):
        StudentConfig(arch="sd15")
    with pytest.raises(ValueError, match="lora rank must be >= 1, got 0"):
        StudentConfig(lora_rank=0)
    assert StudentConfig(arch="tiny").resolved_latent_size() == 8
    assert StudentConfig().resolved_latent_size() == 32


def test_schedule_is_sd_scaled_linear(student):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0).float()
    torch.testing.assert_close(student.alphas_cumprod, ab, atol=1e-6, rtol=1e-5)


class _KnownEps(torch.nn.Module):
    """Stands in for the UNet: returns a fixed eps and records its inputs."""

    def __init__(self, eps):
        super().__init__()
        self.eps, self.seen = eps, {}
        self.dtype = torch.float32

    def forward(self, sample, t, encoder_hidden_states):
        self.seen = dict(sample=sample, t=t, context=encoder_hidden_states)
        return type("Out", (), {"sample": self.eps})()


def test_predict_x0_inverts_the_forward_process():
    # its own student: the UNet is swapped for a stand-in, and a module-scoped fixture must
    # never lose a child (monkeypatch's undo does not restore nn.Module children exactly)
    student = _student()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2 * P, 4, 8, 8, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([999, 749, 499, 249, 10, 0] * 2)
    ab = student.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    text = torch.randn(2, 77, 32, generator=gen)
    fake = _KnownEps(eps)
    student.unet = fake
    torch.testing.assert_close(student.predict_x0(z_t, t, text), x0, atol=2e-4, rtol=1e-4)
    # Every plane of object b is conditioned on text[b].
    for n in range(2 * P):
        assert torch.equal(fake.seen["context"][n], text[n // P])
    with pytest.raises(ValueError, match="6 x text batch"):
        student.predict_x0(z_t[:6], t[:6], text)


def test_encode_text_is_the_frozen_encoders_last_hidden_state(student):
    emb = student.encode_text(["a red cube", "a blue sphere"])
    assert emb.shape == (2, 77, 32) and not emb.requires_grad
    ids = student.tokenizer(["a red cube"], padding="max_length", max_length=77).input_ids
    ids = torch.tensor(ids)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407  # bos, padded with eos
    ref = student.text_encoder(ids).last_hidden_state[0]
    torch.testing.assert_close(emb[0], ref.detach())


def test_decode_splits_channels_and_orders_planes(student):
    x0 = torch.randn(2 * P, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        geo, tex = student.decode(x0)
        # SD decodes z / scaling_factor through post_quant_conv and the decoder.
        feats = student.decoder(student.post_quant_conv(x0 / 0.18215))
    assert geo.shape == tex.shape == (2, 3, C, 32, 32)
    assert feats.shape == (2 * P, 2 * C, 32, 32)
    for b in range(2):
        for k in range(3):  # xy, xz, yz
            assert torch.equal(geo[b, k], feats[b * P + k, :C])
            assert torch.equal(tex[b, k], feats[b * P + 3 + k, C:])


def test_trainable_tensors_are_adapters_and_the_new_conv_out(student):
    for name, p in student.named_parameters():
        new_conv = name.startswith("decoder.conv_out.")
        assert p.requires_grad == ("lora_" in name or new_conv), name
        if p.requires_grad:
            assert p.dtype == torch.float32, name
    counts = count_parameters(student)
    assert counts["trainable"] == sum(counts["groups"].values())
    assert counts["groups"]["new_conv_out"] == 32 * 2 * C * 9 + 2 * C  # 3x3 conv 32 -> 2C


def test_objects_do_not_mix_through_the_student(student):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2 * P, 4, 8, 8, generator=gen)
    t = torch.full((2 * P,), 500)
    text = torch.randn(2, 77, 32, generator=gen)
    z2 = z.clone()
    z2[:P] += 1.0
    with torch.no_grad():
        a, b = student.predict_x0(z, t, text), student.predict_x0(z2, t, text)
    torch.testing.assert_close(a[P:], b[P:], atol=1e-6, rtol=0)
    assert (a[:P] - b[:P]).abs().amax() > 1e-3


def _rss_mb() -> float:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_meta_build_counts_sd21_without_memory():
    rss0 = _rss_mb()
    model = build_student(StudentConfig(arch="sd21"), device="meta")
    counts = count_parameters(model)
    grown_mb = _rss_mb() - rss0  # real weights would be 5 GiB in fp32
    print("sd21 PETA counts:", counts, f"RSS growth {grown_mb:.0f} MB")
    assert grown_mb < 200
    assert next(model.unet.parameters()).device.type == "meta"
    mods = model.peta_modules
    assert (len(mods.unet_conv_lora), len(mods.vae_conv_lora)) == (64, 33)  # docs/reference.md
    assert (len(mods.plane_lora), len(mods.joint_attention)) == (64, 16)
    # Per-plane LoRA, analytic: 6 planes x 4 projections x rank 16 x (d + d) per block,
    # with d summed over SD 2.1's 16 transformer blocks.
    widths = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    assert counts["groups"]["plane_lora"] == 6 * 4 * 16 * 2 * sum(widths)
    # SD 2.1 UNet 865,910,724; VAE decoder 49,490,179 + post_quant_conv 20 - old conv_out 3,459
    assert counts["frozen"] == 865_910_724 + 49_486_740
    assert abs(counts["trainable"] / 22.7e6 - 1) < 0.01  # docs/reference.md: about 22.7M
    assert 0.024 < counts["ratio"] < 0.026  # paper: 2.5%


def test_missing_pretrained_folder_names_path_and_files(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        build_student(StudentConfig(arch="tiny", pretrained=str(tmp_path)))
    msg = str(err.value)
    assert str(tmp_path) in msg and "unet/diffusion_pytorch_model.safetensors" in msg
    assert "scheduler/scheduler_config.json" in msg


def test_pretrained_folder_round_trip(tmp_path, student):
    """A diffusers-format folder written from the tiny base loads into the same student."""
    torch.manual_seed(0)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from prd.arch import TINY_TEXT, TINY_UNET, TINY_VAE, sd_scheduler

    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text.save_pretrained(tmp_path / "text_encoder")
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    student.tokenizer.save_pretrained(tmp_path / "tokenizer")
    sd_scheduler().save_pretrained(tmp_path / "scheduler")

    loaded = build_student(StudentConfig(arch="tiny", pretrained=str(tmp_path)))
    torch.manual_seed(0)
    built = build_student(StudentConfig(arch="tiny"))
    for name in ("unet.conv_in.weight", "decoder.mid_block.resnets.0.conv1.base_layer.weight"):
        assert torch.equal(loaded.get_parameter(name), built.get_parameter(name)), name
    with pytest.raises(ValueError, match="block_out_channels"):
        build_student(StudentConfig(arch="sd21", pretrained=str(tmp_path)))


def test_gradient_checkpointing_gives_the_same_gradients(randomize_trainable):
    grads = []
    for ckpt in (False, True):
        model = randomize_trainable(_student(gradient_checkpointing=ckpt), 3).train()
        assert model.unet.is_gradient_checkpointing == ckpt
        z = torch.randn(P, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.full((P,), 600)
        geo, tex = model.decode(model.predict_x0(z, t, torch.ones(1, 77, 32)))
        (geo.square().mean() + tex.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_denoiser_skip_starts_as_the_gaussian_mmse_denoiser():
    # eps = sqrt(1 - ab) z + UNet(z) with the UNet's conv_out zeroed: x0 = sqrt(ab) z, the
    # posterior mean of x0 ~ N(0, I) given z_t, whatever the text.
    torch.manual_seed(0)
    model = build_student(StudentConfig(arch="tiny", denoiser_skip=True, train_base=True))
    z = torch.randn(2 * P, 4, 8, 8)
    t = torch.tensor([999, 749, 499, 249, 10, 0] * 2)
    text = model.encode_text(["a red cube", "a blue torus"])
    with torch.no_grad():
        x0 = model.predict_x0(z, t, text)
    ab = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x0, ab.sqrt() * z)
    assert all(p.requires_grad for p in model.unet.parameters())
    with pytest.raises(ValueError, match="denoiser_skip"):
        StudentConfig(arch="tiny", pretrained="/models/sd", denoiser_skip=True)


def _saved_bytes(fn) -> tuple[object, int]:
    """fn()'s result and the bytes of the tensors autograd saved for backward outside any
    checkpointed segment (what the forward keeps alive until the backward)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_chunked_decode_gives_the_same_triplanes_and_gradients(randomize_trainable):
    """Two objects (12 planes) decoded whole, in checkpointed chunks of 5 (a remainder
    chunk of 2), and in chunks of 1 with the UNet checkpointed: equal triplanes and
    gradients (adapters, new conv_out, latents), and the chunked forward keeps less."""
    x0 = torch.randn(2 * P, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    runs = []
    for chunk, ckpt in ((0, False), (5, False), (1, True)):
        model = randomize_trainable(
            _student(decode_chunk=chunk, gradient_checkpointing=ckpt), 3
        ).train()
        assert model.decoder.gradient_checkpointing is False  # chunks replace its segments
        calls = []
        model.decoder.conv_in.register_forward_hook(lambda m, i, o, c=calls: c.append(len(i[0])))
        x = x0.clone().requires_grad_(True)
        (geo, tex), kept = _saved_bytes(lambda m=model, x=x: m.decode(x))
        (geo.square().mean() + (tex * torch.linspace(0, 1, tex.shape[-1])).mean()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        runs.append((geo.detach(), tex.detach(), x.grad, grads, kept, calls))
    ref = runs[0]
    assert ref[5] == [2 * P]  # one pass, no recompute
    # forward, then each chunk recomputed in backward (last chunk first)
    assert runs[1][5] == [5, 5, 2, 2, 5, 5] and runs[2][5] == [1] * (4 * P)
    for geo, tex, dx, grads, kept, _ in runs[1:]:
        torch.testing.assert_close(geo, ref[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tex, ref[1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(dx, ref[2], atol=1e-7, rtol=1e-5)
        assert grads.keys() == ref[3].keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, ref[3][n], atol=1e-7, rtol=1e-5, msg=n)
        assert kept < ref[4] / 20  # only the triplanes' slices and the chunks' seams


def test_decode_chunk_must_not_be_negative():
    with pytest.raises(ValueError, match="decode_chunk must be >= 0.*-1"):
        StudentConfig(arch="tiny", decode_chunk=-1)
