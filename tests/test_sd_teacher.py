"""The SD teacher (``teachers.sd``) on a tiny random SD folder written with save_pretrained:
parity with direct diffusers calls, the VAE encode's gradient, CFG with a negative
prompt, v-prediction, and the teacher that shares the student's base weights."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import write_tiny_sd
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from prd.arch import TINY_VAE
from prd.student import StudentConfig, build_student
from prd.teacher_setup import StudentBase, TeacherSpec, check_teachers, sd_denoiser
from renderers.cameras import CameraSampling, sample_cameras
from teachers import guidance as G
from teachers import sd
from teachers.base import Views, assert_frozen
from teachers.distill import DistillationTeacher
from teachers.roles import SingleViewRGB


def _direct(folder):
    """The folder's tokenizer, text encoder and UNet loaded straight through diffusers."""
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    return tok, text, unet


def _states(tok, text, prompts):
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return text(ids.input_ids).last_hidden_state


def _views(n_objects: int, size: int = 16, seed: int = 0, grad: bool = False) -> Views:
    gen = torch.Generator().manual_seed(seed)
    cams = sample_cameras(n_objects, CameraSampling(), gen)
    n = len(cams)
    rgb = torch.rand(n, size, size, 3, generator=gen).requires_grad_(grad)
    normal = torch.nn.functional.normalize(torch.randn(n, size, size, 3, generator=gen), dim=-1)
    return Views(rgb, torch.ones(n, size, size), torch.ones(n, size, size), normal, cams, 4)


def test_eps_equals_a_direct_unet_call_on_the_text_encoders_last_states(tiny_sd_folder):
    den = sd.load_pretrained(tiny_sd_folder)
    assert_frozen(den, "sd")
    assert den.prediction_type == "epsilon" and den.downsampling() == 4
    tok, text, unet = _direct(tiny_sd_folder)
    prompts = ["a red cube", "", "a blue cone"]
    cond = den.encode_text(prompts)
    torch.testing.assert_close(cond, _states(tok, text, prompts), rtol=0, atol=0)
    assert torch.equal(den.encode_text(["a blue cone"])[0], cond[2])  # from the memo
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([20, 500, 999])
    with torch.no_grad():
        want = unet(x_t, t, encoder_hidden_states=cond).sample
    assert torch.equal(den(x_t, t, cond, None), want)
    assert want.abs().mean() > 1e-3  # a fresh diffusers UNet's output is not zero


def test_v_prediction_becomes_eps_as_diffusers_defines_v(tmp_path, tiny_sd_folder):
    """A UNet answering the exact v of (x0, noise), per diffusers' get_velocity, gives
    eps = the noise."""
    folder = write_tiny_sd(tmp_path / "v", prediction_type="v_prediction")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 900])
    x_t = scheduler.add_noise(x0, noise, t)
    v = scheduler.get_velocity(x0, noise, t)

    class ExactV(torch.nn.Module):
        dtype = torch.float32

        def forward(self, x, t_in, encoder_hidden_states):
            assert torch.equal(x, x_t) and torch.equal(t_in, t)
            return SimpleNamespace(sample=v)

    tok, text, _ = _direct(folder)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    den = sd.SDDenoiser(tok, text, ExactV(), vae, scheduler)
    assert den.prediction_type == "v_prediction"
    eps = den(x_t, t, torch.zeros(2, 77, 32), None)
    torch.testing.assert_close(eps, noise, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v, noise, atol=0.1)  # taking v for eps would fail
    other = dict(scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type 'sample' is not one of"):
        sd.SDDenoiser(tok, text, ExactV(), vae, DDPMScheduler.from_config(other))


def test_vae_encode_gradient_matches_finite_differences():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(**dict(TINY_VAE, block_out_channels=(8, 8, 8), norm_num_groups=4))
    vae = vae.double().requires_grad_(False)
    image = (torch.rand(1, 3, 8, 8, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    weights = torch.randn(1, 4, 2, 2, dtype=torch.float64)

    def f(x, ckpt=False):
        return (sd.vae_encode(vae, x, torch.Generator().manual_seed(3), ckpt) * weights).sum()

    assert torch.autograd.gradcheck(f, (image,), eps=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(f(image, ckpt), image)[0] for ckpt in (False, True)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
    # the latent sample comes from the generator, not the global RNG
    state = torch.get_rng_state()
    a = sd.vae_encode(vae, image, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    b = sd.vae_encode(vae, image, torch.Generator().manual_seed(4))
    assert torch.equal(a, sd.vae_encode(vae, image, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, b)
    scale = vae.config.scaling_factor
    with torch.no_grad():
        mean = vae.quant_conv(vae.encoder(image)).chunk(2, dim=1)[0] * scale
    assert (a - mean).abs().max() < 10 * scale  # a posterior sample around the scaled mean


def test_cfg_with_the_negative_prompt_matches_a_hand_computed_combination(tiny_sd_folder):
    den = sd.load_pretrained(tiny_sd_folder)
    cfg = G.GuidanceConfig(loss="sds_uniform", guidance_scale=7.5, reference_numel=4 * 64 * 64)
    teacher = DistillationTeacher(
        "sd", SingleViewRGB(view_offset=2), den, cfg, 16, den.schedule,
        den.encode_images, den.decode_latents, negative_prompt="blurry, ugly",
    )  # fmt: skip
    views = _views(2)
    prompts = ["a red cube", "a white torus"]
    out = teacher(views, prompts, 0, torch.Generator().manual_seed(7))

    # by hand: views 2 and 6, VAE sample, timesteps, noise in the teacher's draw order
    tok, text, unet = _direct(tiny_sd_folder)
    vae = AutoencoderKL.from_pretrained(tiny_sd_folder, subfolder="vae")
    gen = torch.Generator().manual_seed(7)
    image = views.rgb[[2, 6]].permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(image))
    mean, logvar = moments.chunk(2, dim=1)
    x = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)) * 0.18215
    t = torch.randint(500, 981, (2,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    ab = DDPMScheduler.from_pretrained(tiny_sd_folder, subfolder="scheduler").alphas_cumprod
    a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x + s * noise
    with torch.no_grad():
        eps_c = unet(x_t, t, encoder_hidden_states=_states(tok, text, prompts)).sample
        negative = _states(tok, text, ["blurry, ugly"] * 2)
        eps_u = unet(x_t, t, encoder_hidden_states=negative).sample
    g = eps_u + 7.5 * (eps_c - eps_u) - noise
    c = 4 * 64 * 64 / (x[0].numel() * 2)
    assert torch.equal(out.timesteps, t)
    torch.testing.assert_close(out.loss, 0.5 * c * g.square().sum(), rtol=1e-4, atol=0)
    torch.testing.assert_close(out.x0, (x_t - s * (eps_u + 7.5 * (eps_c - eps_u))) / a,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    assert out.target.shape == (2, 16, 16, 3)


def _student(folder, seed: int, randomize_trainable):
    cfg = StudentConfig(arch="tiny", pretrained=str(folder), lora_rank=4, lora_alpha=4.0)
    return randomize_trainable(build_student(cfg), seed, scale=0.05)


def test_the_teacher_on_the_students_folder_shares_its_weights(tiny_sd_folder, randomize_trainable):
    student = _student(tiny_sd_folder, 1, randomize_trainable)
    base = StudentBase(
        folder=str(tiny_sd_folder),
        unet=student.unet,
        text_encoder=student.text_encoder,
        unet_context=student.base_unet,
        text_fn=student.encode_text,
    )
    spec = TeacherSpec(pretrained=str(tiny_sd_folder), resolution=16)
    shared, separate = sd_denoiser(spec, "cpu", base), sd_denoiser(spec, "cpu", None)
    assert shared.borrowed is not None and separate.borrowed is None
    owned = {n.split(".")[0] for n, _ in shared.named_parameters()}
    assert owned == {"vae"}  # no second UNet or text encoder
    assert_frozen(shared, "sd")

    z = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t6 = torch.tensor([999, 999, 999, 999, 999, 999])
    text = student.encode_text(["a red cube"])
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    before = student.predict_x0(z, t6, text)

    x_t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([30, 400, 990])
    cond = shared.encode_text(["a red cube", "", "a cone"])
    torch.testing.assert_close(cond, separate.encode_text(["a red cube", "", "a cone"]))
    eps_shared = shared(x_t, t, cond, None)
    torch.testing.assert_close(eps_shared, separate(x_t, t, cond, None), rtol=1e-5, atol=1e-6)

    # adapters back on, exactly: the same x0, the same trainable flags
    assert torch.equal(student.predict_x0(z, t6, text), before)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    # ... and they matter: the adapted UNet's eps is not the base's
    x6 = torch.cat([x_t, x_t])
    with torch.no_grad():
        adapted = student.unet(x6, t.repeat(2), encoder_hidden_states=cond.repeat(2, 1, 1)).sample
    assert (adapted[:3] - eps_shared).abs().max() > 1e-3

    # the same teacher loss either way
    losses = []
    for den in (shared, separate):
        teacher = DistillationTeacher(
            "sd", SingleViewRGB(), den, G.sd_guidance(), 16, den.schedule,
            den.encode_images, den.decode_latents,
        )  # fmt: skip
        losses.append(teacher(_views(1), ["a red cube"], 0, torch.Generator().manual_seed(5)).loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    assert torch.equal(student.predict_x0(z, t6, text), before)


def test_a_missing_subfolder_or_folder_is_named_before_loading(tmp_path, tiny_sd_folder):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_folder, broken, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(FileNotFoundError) as err:
        sd.load_pretrained(broken)
    msg = str(err.value)
    missing = msg.split("is missing")[1].split(";")[0]
    assert str(broken) in msg and "vae/config.json" in missing and "unet/config.json" not in missing
    assert "a diffusers-format Stable Diffusion folder has" in msg

    cfg = SimpleNamespace(
        sd=TeacherSpec(pretrained=str(tmp_path / "none")),
        mvdream=TeacherSpec(enabled=False),
        richdreamer=TeacherSpec(enabled=False),
    )
    with pytest.raises(FileNotFoundError, match=f"teachers.sd.pretrained: no folder {tmp_path}"):
        check_teachers(cfg)
    cfg.sd = TeacherSpec()
    with pytest.raises(ValueError, match="teachers.sd.pretrained is not set"):
        check_teachers(cfg)
    cfg.sd = TeacherSpec(enabled=False)
    cfg.mvdream = TeacherSpec(source="pretrained", pretrained=str(tiny_sd_folder))
    with pytest.raises(ValueError, match="teachers.mvdream.source=pretrained.*not in this"):
        check_teachers(cfg)
    with pytest.raises(ValueError, match="negative_prompt must be ''"):
        TeacherSpec(source="oracle", negative_prompt="ugly")


def test_prompts_are_encoded_once_and_a_bf16_teacher_returns_an_fp32_loss(tiny_sd_folder):
    tok, text, unet = _direct(tiny_sd_folder)
    vae = AutoencoderKL.from_pretrained(tiny_sd_folder, subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(tiny_sd_folder, subfolder="scheduler")
    seen = []

    def text_fn(prompts):
        seen.append(list(prompts))
        return _states(tok, text, prompts)

    den = sd.SDDenoiser(tok, text, unet, vae, scheduler, text_fn=text_fn)
    den.encode_text(["a", "b", "a"])
    den.encode_text(["b", "", "a"])
    assert seen == [["a", "b"], [""]]

    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        den = sd.load_pretrained(tiny_sd_folder, dtype=dtype)
        assert den.models()[0].dtype == dtype and den.vae.dtype == dtype
        teacher = DistillationTeacher(
            "sd", SingleViewRGB(), den, G.sd_guidance(), 16, den.schedule,
            den.encode_images, den.decode_latents,
        )  # fmt: skip
        views = _views(1, grad=True)
        out = teacher(views, ["a red cube"], 0, torch.Generator().manual_seed(5))
        out.loss.backward()
        assert out.loss.dtype == torch.float32 and views.rgb.grad.dtype == torch.float32
        losses.append(out.loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.1)
