"""``prd tiny-teachers``: learned tiny MVDream / ND-MV in the released files' layouts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_multiview_unet import fill

import prd.tiny_base as tb
import prd.tiny_teachers as tt
from prd.arch import TINY_UNET, encode_prompts, load_pretrained, sd_scheduler
from prd.progressive import add_noise
from prompts.tokenizer import build_clip_tokenizer
from renderers.cameras import CameraSampling
from teachers import multiview_unet as mv
from teachers import mvdream, richdreamer
from teachers.base import assert_frozen
from teachers.noise import NoiseSchedule
from teachers.oracle import OracleDenoiser, OracleRichDreamer
from teachers.roles import MultiViewNormalDepth, MultiViewRGB
from teachers.scenes import COLORS, HELDOUT_PROMPTS, TRAIN_PROMPTS, parse_prompt

REPO = Path(__file__).resolve().parents[1]
FAST_BASE = tb.Recipe(views=4, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4)
FAST = tt.Recipe(sets=1, mv_steps=2, mv_batch=2, nd_steps=2, nd_batch=2)
CAMERAS = CameraSampling(elevation_range=(-30.0, 30.0), fov_y=50.0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A FAST build (read only) and the (shape, colour) of every view it rendered."""
    seen = []

    def recording(render):
        def wrapper(shapes, colors, *args, **kwargs):
            names = list(COLORS)
            table = torch.tensor(list(COLORS.values()))
            index = (colors.float()[:, None] - table).abs().sum(-1).argmin(1)
            assert torch.allclose(colors.float(), table[index])
            seen.extend(zip(shapes, (names[i] for i in index.tolist())))
            return render(shapes, colors, *args, **kwargs)

        return wrapper

    out = tmp_path_factory.mktemp("tiny") / "teachers"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tb, "render_scenes", recording(tb.render_scenes))
        mp.setattr(tt, "render_scenes", recording(tt.render_scenes))
        tt.build_tiny_teachers(out, CAMERAS, FAST, base_recipe=FAST_BASE, log=lambda s: None)
    return out, seen


def test_the_build_renders_the_training_scenes_only(built):
    out, seen = built
    heldout = {tuple(reversed(parse_prompt(p))) for p in HELDOUT_PROMPTS}
    train = {tuple(reversed(parse_prompt(p))) for p in TRAIN_PROMPTS}
    assert set(seen) == train and not set(seen) & heldout
    # tiny-base's 4 views and the teachers' one 4-view set of each scene
    assert len(seen) == len(TRAIN_PROMPTS) * (FAST_BASE.views + 4)
    assert tt.read_manifest(out)["rendered_prompts"] == list(TRAIN_PROMPTS)


def test_files_have_the_released_layouts_and_load_through_the_ports_loaders(built):
    out, _ = built
    flat = torch.load(out / "mvdream.pt", weights_only=True)
    nd = torch.load(out / "nd_mv.ckpt", weights_only=True)
    assert set(nd) == {"state_dict"}
    for sd, kwargs in ((flat, tt.MV_LDM), (nd["state_dict"], tt.ND_LDM)):
        fresh = mv.MultiViewUNet.build(mv.unet_config(kwargs)).state_dict()
        names = mv.diffusers_to_ldm(fresh, mv.unet_config(kwargs))
        assert set(sd) == {mv.PREFIX + k for k in names}
        assert "model.diffusion_model.camera_embed.0.weight" in sd

    mv_unet = mvdream.load_original(out / "mvdream.pt", **tt.MV_LDM)
    nd_unet = richdreamer.load_original(out / "nd_mv.ckpt", **tt.ND_LDM)
    teachers = tt.load_teachers(out)
    for name, unet in (("mvdream", mv_unet), ("richdreamer", nd_unet)):
        assert_frozen(teachers[name], name)
        a, b = teachers[name].unet.state_dict(), unet.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)

    # MVDream reads the tiny SD's text encoder; ND-MV a copy of it (its own folder)
    tokenizer, text_encoder, unet, vae, _ = load_pretrained(out / "sd", "tiny", torch.float32)
    prompts = ["a red cube", ""]
    want = encode_prompts(tokenizer, text_encoder, prompts)
    assert torch.equal(teachers["mvdream"].encode_text(prompts), want)
    assert torch.equal(teachers["richdreamer"].encode_text(prompts), want)
    info = tt.read_manifest(out)
    assert info["mvdream"]["scaling_factor"] == vae.config.scaling_factor
    assert info["richdreamer"]["depth_radius"] == tt.DEPTH_RADIUS


@pytest.mark.parametrize(("kwargs", "module"), [(tt.MV_LDM, mvdream), (tt.ND_LDM, richdreamer)])
def test_original_checkpoint_round_trips_the_outputs(tmp_path, kwargs, module):
    unet = fill(mv.MultiViewUNet.build(mv.unet_config(kwargs)), seed=3).eval()
    torch.save(tt.original_checkpoint(unet, kwargs), tmp_path / "ckpt")
    loaded = module.load_original(tmp_path / "ckpt", **kwargs)
    gen = torch.Generator().manual_seed(0)
    size = kwargs["image_size"]
    x = torch.randn(4, 4, size, size, generator=gen)
    c = torch.randn(4, 77, kwargs["context_dim"], generator=gen)
    t, cam = torch.tensor([999, 999, 999, 999]), mvdream.get_camera(4, 15, 0)
    with torch.no_grad():
        assert torch.equal(unet(x, t, c, cam, num_frames=4), loaded(x, t, c, cam, num_frames=4))


def test_mvdream_starts_from_the_sd_unet():
    from diffusers import UNet2DConditionModel

    sd = fill(UNet2DConditionModel(**TINY_UNET), seed=1)
    model = tt.from_single_view(sd, tt.MV_LDM)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in sd.state_dict().items())
    assert not model.class_embedding.linear_2.weight.any()
    # a camera changes nothing at the start (its MLP's output layer is zero)
    x, c = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 32)
    t, cam = torch.full((4,), 500), mvdream.get_camera(4, 15, 0)
    with torch.no_grad():
        assert torch.equal(model(x, t, c, cam, num_frames=4), model(x, t, c, None, num_frames=4))


def test_nd_mv_starts_from_the_sd_unet_below_its_32_px_level():
    """Every ND-MV tensor is the tiny SD's one level up (linear projections as 1x1 convs),
    except those of its extra 32 px level and its camera MLP (output zero)."""
    from diffusers import UNet2DConditionModel

    sd = fill(UNet2DConditionModel(**TINY_UNET), seed=1)
    nd = tt.nd_from_single_view(sd, tt.ND_LDM)
    theirs, new = sd.state_dict(), set()
    for name, value in nd.state_dict().items():
        src = theirs.get(tt.shifted_level(name, 1))
        if src is None or src.numel() != value.numel():
            new.add(name.split(".weight")[0].split(".bias")[0])
        else:
            assert torch.equal(value, src.reshape(value.shape)), name
    blocks = {".".join(n.split(".")[:2]) for n in new}
    assert blocks == {"class_embedding.linear_1", "class_embedding.linear_2", "down_blocks.0",
                      "up_blocks.1", "up_blocks.2"}, blocks  # fmt: skip
    assert all(n.startswith("up_blocks.1.upsamplers") for n in new if "up_blocks.1" in n)
    # the SD's text cross-attention sits at ND-MV's 8 x 8 level
    k = "attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(nd.state_dict()["down_blocks.2." + k], theirs["down_blocks.1." + k])
    assert not nd.class_embedding.linear_2.weight.any()


def test_training_inputs_are_what_the_roles_and_oracles_pack():
    gen = torch.Generator().manual_seed(0)
    prompts = ["a red cube", "a blue torus"]
    views, labels = tt.render_view_sets(prompts, 2, CAMERAS, gen)
    assert labels.tolist() == [0, 0, 1, 1] and len(views.rgb) == 16
    per_view = [prompts[i] for i in labels.repeat_interleave(4).tolist()]
    cams = views.cameras
    assert OracleRichDreamer().role.radius == tt.DEPTH_RADIUS  # the oracle preset's ND role
    for role in (MultiViewRGB(4), MultiViewNormalDepth(4, radius=tt.DEPTH_RADIUS)):
        oracle = OracleDenoiser(role, NoiseSchedule(), tt.BACKGROUND, supersample=2)
        truth = oracle.ground_truth(per_view, cams, tt.RESOLUTION)
        assert torch.allclose(role.encode(views, tt.RESOLUTION), truth, atol=1e-6)
    # at radius 0.5 the scenes' depths (distance +- 0.55) stay inside (-1, 1), off -1
    depth = MultiViewNormalDepth(4, radius=tt.DEPTH_RADIUS).encode(views, 32)[:, 3]
    inside = views.mask > 0.99
    bound = 0.55 / (tt.DEPTH_RADIUS * math.sqrt(3))
    assert depth[inside].abs().max() <= bound + 1e-3 and depth[~(views.mask > 0)].eq(-1).all()


def test_a_teacher_trained_on_one_scene_denoises_it_better_than_another():
    """The ND-MV teacher at 8 px, trained 160 steps on the 4-view sets of "a red cube":
    its eps error on fixed noise at t = 50, 100, 200 (where the learnt scene decides the
    answer), on the cube's renders against a torus's, both under the cube's prompt. Equal
    (within 3%) before training; measured after: the torus's 1.7x the cube's."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    prompts, size = ["a red cube", "a blue torus"], 8
    views, labels = tt.render_view_sets(prompts, 2, CAMERAS, gen, size=size)
    x0 = MultiViewNormalDepth(4, radius=tt.DEPTH_RADIUS).encode(views, size)
    camera = richdreamer.camera_condition(views.cameras)
    encoder = tb.frozen_text_encoder(0.3, gen)
    text = encode_prompts(build_clip_tokenizer(), encoder, prompts + [""])
    unet = mv.MultiViewUNet.build(mv.unet_config(dict(tt.ND_LDM, image_size=size)))
    rows = [tt.object_rows(torch.nonzero(labels == scene)[:, 0]) for scene in (0, 1)]

    def error(scene: int) -> float:
        ab, r, total = sd_scheduler().alphas_cumprod, rows[scene], 0.0
        with torch.no_grad():
            for t in (50, 100, 200):
                noise = torch.randn(x0[r].shape, generator=torch.Generator().manual_seed(t))
                tv = torch.full((len(r),), t)
                x_t = add_noise(x0[r], noise, tv, ab)
                ctx = text[0].expand(len(r), -1, -1)
                eps = unet(x_t, timesteps=tv, context=ctx, camera=camera[r], num_frames=4)
                total += (eps - noise).square().mean().item()
        return total

    assert error(1) == pytest.approx(error(0), rel=0.03)
    recipe = tt.Recipe(lr=5e-3, high_t_share=0.0, empty_share=0.0)
    cube_sets = torch.zeros(2, dtype=torch.long)  # both sets: text row 0, the cube's prompt
    tt.train_multiview(
        unet, x0[rows[0]], camera[rows[0]], cube_sets, text, 160, 2, recipe, gen, log=lambda s: None
    )
    assert error(1) > 1.3 * error(0)
