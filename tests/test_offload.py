"""teachers.offload (prd.offload): teacher-by-teacher scoring gives the draws and gradients
of scoring each teacher alone in turn, each offloaded teacher is on the device exactly for
its own calls and gradients, and the SD teacher on the student's base never moves."""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_multiview_unet import fill
from test_real_teachers import TINY_MV, TINY_ND
from test_real_teachers import teacher_files as _teacher_files  # noqa: F401 (fixture)
from transformers import CLIPTextConfig, CLIPTextModel

from bench.sd_teacher import teacher_in_code
from prd.arch import TINY_TEXT, TINY_UNET
from prd.branches import BranchOut, score_branches
from prd.offload import HostCopy, _tensors, attach, offloaded_bytes, plan
from prd.pretrained_teachers import StudentBase
from prd.teacher_setup import TeachersConfig, TeacherSpec, build_teachers, role_teachers
from prompts.tokenizer import build_clip_tokenizer
from renderers.cameras import CameraSampling, sample_cameras
from teachers import multiview_unet as mv
from teachers import mvdream, richdreamer
from teachers.base import Views
from teachers.guidance import mvdream_guidance, richdreamer_guidance, sd_guidance
from teachers.noise import NoiseSchedule
from teachers.sd import LatentCodec, encode_prompts

PROMPTS = ["a red cube", "a blue ball"]


def tiny_roles(shared_base: bool):
    """(roles, student modules): tiny SD, MVDream and ND-MV teachers wired as
    ``build_teachers`` wires pretrained ones. shared_base: the SD teacher runs a stand-in
    student's UNet and text encoder (kept resident), else it owns its copies; MVDream
    uses the SD teacher's VAE (checkpointed encoders: their recompute runs inside the
    gradient) and the student's text encoder, ND-MV its own CLIP."""
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    unet, text = UNet2DConditionModel(**TINY_UNET), CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    student = torch.nn.ModuleList([unet, text]).requires_grad_(False).eval()
    text_fn = lambda prompts: encode_prompts(tokenizer, text, prompts)  # noqa: E731
    base = StudentBase(None, unet, text, contextlib.nullcontext, text_fn)
    sd_den = teacher_in_code("tiny", True, base if shared_base else None)
    n_views = 4
    spec = lambda g: TeacherSpec(resolution=16, guidance=g)  # noqa: E731
    sd = role_teachers(
        "sd", spec(sd_guidance()), sd_den, sd_den.schedule, n_views,
        sd_den.encode_images, sd_den.decode_latents, weights=(sd_den,), keep_resident=shared_base,
    )  # fmt: skip
    mv_unet = fill(mv.MultiViewUNet.build(mv.unet_config(TINY_MV)), seed=3)
    mv_den = mvdream.MultiViewDenoiser(
        mv_unet, None, None, mvdream.camera_condition, text_fn=text_fn
    )
    codec = LatentCodec(sd_den.vae, True, "MVDream")
    mvd = role_teachers(
        "mvdream", spec(mvdream_guidance()), mv_den, NoiseSchedule(), n_views,
        codec.encode_images, codec.decode_latents, weights=(mv_den, codec),
    )  # fmt: skip
    nd_unet = fill(mv.MultiViewUNet.build(mv.unet_config(TINY_ND)), seed=4)
    nd_text = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=77, eos_token_id=49407)
    )  # fmt: skip
    nd_den = mvdream.MultiViewDenoiser(
        nd_unet, nd_text.requires_grad_(False).eval(), tokenizer, richdreamer.camera_condition
    )
    nd = role_teachers(
        "richdreamer", spec(richdreamer_guidance()), nd_den, NoiseSchedule(), n_views,
        weights=(nd_den,),
    )  # fmt: skip
    return [sd, mvd, nd], student


def renders(seed: int = 7, size: int = 16):
    """(branches, leaves): two branches' Views of 2 objects x 4 views, every channel a
    differentiable function of a leaf tensor."""
    gen = torch.Generator().manual_seed(seed)
    leaves, branches = {}, {}
    for name in ("volume", "mesh"):
        cams = sample_cameras(2, CameraSampling(), gen)
        raw = torch.randn(len(cams), size, size, 6, generator=gen).requires_grad_(True)
        leaves[name] = raw
        views = Views(
            rgb=torch.sigmoid(raw[..., :3]),
            mask=torch.sigmoid(raw[..., 3] + 2),
            depth=1.5 + 0.1 * torch.tanh(raw[..., 4]),
            normal=torch.nn.functional.normalize(raw[..., :3] + raw[..., 5:], dim=-1),
            cameras=cams,
            views_per_object=4,
        )
        branches[name] = BranchOut(views, {})
    return branches, leaves


def test_teacher_by_teacher_gives_each_teacher_alone_in_turn():
    roles, _ = tiny_roles(shared_base=False)
    attach(roles, "cpu")
    assert all(r.host is not None and not r.host.resident for r in roles)
    runs = {}
    for how in ("offload", "alone", "branch_outer"):
        branches, leaves = renders()
        gen = torch.Generator().manual_seed(3)
        if how == "offload":
            s = score_branches(branches, roles, PROMPTS, 0, gen, offload=True)
            losses, total = s.losses, s.loss
        elif how == "alone":  # the known answer: each teacher scored alone, one after another
            parts = [score_branches(branches, [r], PROMPTS, 0, gen) for r in roles]
            losses = {k: v for p in parts for k, v in p.losses.items()}
            total = sum(p.loss for p in parts)
        else:  # today's order without offload
            s = score_branches(branches, roles, PROMPTS, 0, gen)
            losses, total = s.losses, s.loss
        total.backward()
        runs[how] = (losses, {n: x.grad for n, x in leaves.items()}, gen.get_state())
    (l_off, g_off, s_off), (l_alone, g_alone, s_alone) = runs["offload"], runs["alone"]
    assert list(l_off) == [(r.name, b) for r in roles for b in ("volume", "mesh")]
    assert l_off.keys() == l_alone.keys()
    for key in l_off:
        assert torch.equal(l_off[key], l_alone[key]), key
    assert torch.equal(s_off, s_alone)  # the same draws, in the same number
    for name in g_off:
        assert g_off[name].abs().sum() > 0
        torch.testing.assert_close(g_off[name], g_alone[name], rtol=1e-6, atol=1e-9)
    # the order matters: branch by branch, the teachers draw other noise
    l_outer = runs["branch_outer"][0]
    assert any(not torch.equal(l_outer[k], l_off[k]) for k in l_off)
    assert all(not r.host.resident for r in roles)


def spy(monkeypatch, roles, modules):
    """Events of one scoring: ("in"/"out", role) on every HostCopy move, ("call", tag,
    resident offloaded roles) on every forward of ``modules`` (tag -> module)."""
    events = []
    resident = lambda: frozenset(r.name for r in roles if r.host and r.host.resident)  # noqa: E731
    to_device, to_host = HostCopy.to_device, HostCopy.to_host

    def moved_in(self):
        events.append(("in", self.name))
        to_device(self)

    def moved_out(self):
        events.append(("out", self.name))
        to_host(self)

    monkeypatch.setattr(HostCopy, "to_device", moved_in)
    monkeypatch.setattr(HostCopy, "to_host", moved_out)
    for tag, m in modules.items():
        m.register_forward_pre_hook(
            lambda _m, _a, tag=tag: events.append(("call", tag, resident()))
        )
    return events


@pytest.mark.parametrize("shared_base", [True, False])
def test_each_teacher_is_resident_exactly_for_its_calls(monkeypatch, shared_base):
    roles, student = tiny_roles(shared_base)
    sd, mvd, nd = roles
    attach(roles, "cpu")
    if shared_base:  # the SD teacher and the VAE it shares stay; the student is no one's
        assert sd.host is None
        vae = {id(t) for t in _tensors([sd.denoiser.vae])}
        moved = {id(t) for r in (mvd, nd) for t, _ in r.host.slots}
        assert not vae & moved and not {id(t) for t in _tensors([student])} & moved
    else:
        assert sd.host is not None
    modules = {
        "sd": sd.denoiser,
        "mvdream": mvd.denoiser,
        "richdreamer": nd.denoiser,
        "vae_encoder": sd.denoiser.vae.encoder,
        "nd_text": nd.denoiser.text_encoder,
    }
    events = spy(monkeypatch, roles, modules)
    branches, _ = renders()
    score_branches(branches, roles, PROMPTS, 0, torch.Generator().manual_seed(3),
                   on_score=lambda t, b: events.append(("scored", t, b)), offload=True)  # fmt: skip
    offloaded = [r.name for r in roles if r.host is not None]
    moves = [e for e in events if e[0] in ("in", "out")]
    assert moves == [(d, n) for n in offloaded for d in ("in", "out")]  # once per step
    # each call, gradient included, belongs to the teacher whose "scored" comes next
    # (on_score follows the gradient); it runs with that teacher, if offloaded, the only
    # offloaded one resident, and none otherwise
    calls, pending = [], []
    for e in events:
        if e[0] == "call":
            pending.append(e)
        elif e[0] == "scored":
            calls += [(e[1], tag, res) for _, tag, res in pending]
            pending = []
    assert not pending and len(calls) == sum(e[0] == "call" for e in events)
    for teacher, tag, res in calls:
        assert res == ({teacher} if teacher in offloaded else set()), (teacher, tag, res)
        assert tag in (teacher, "vae_encoder", "nd_text"), (teacher, tag)
    # the checkpointed encoders recompute inside the gradient: SD and MVDream encode on 2
    # branches each, and each encode runs twice
    assert sum(tag == "vae_encoder" for _, tag, _ in calls) == 8
    # a teacher leaves the device right after its last branch's gradient
    for name in offloaded:
        i = events.index(("out", name))
        assert events[i - 1] == ("scored", name, "mesh"), events[i - 1]
    assert all(not r.host.resident for r in roles if r.host is not None)


def test_plan_and_bytes_follow_what_stays():
    shared, _ = tiny_roles(shared_base=True)
    own, _ = tiny_roles(shared_base=False)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    vae = nbytes(_tensors([own[0].denoiser.vae]))
    unet = lambda r: nbytes(_tensors([r.denoiser.unet]))  # noqa: E731
    nd_all = nbytes(_tensors([own[2].denoiser]))
    p = plan(shared)
    assert set(p) == {"mvdream", "richdreamer"}
    assert nbytes(p["mvdream"]) == unet(shared[1])  # the VAE stays with the SD teacher
    assert offloaded_bytes(shared) == {
        "kept_off": unet(shared[1]) + nd_all,
        "moved_per_step": unet(shared[1]) + nd_all,
    }
    sd_own = nbytes(_tensors([own[0].denoiser]))  # its UNet, text encoder and VAE
    assert offloaded_bytes(own) == {
        "kept_off": sd_own + unet(own[1]) + nd_all,
        "moved_per_step": sd_own + unet(own[1]) + vae + nd_all,  # the VAE moves twice
    }


def test_build_teachers_offloads_what_each_loaded_role_owns(tiny_sd_folder, request):
    mv_file, nd_file, clip_l = request.getfixturevalue("_teacher_files")
    pretrained = lambda path, **kw: TeacherSpec(pretrained=str(path), resolution=16, **kw)  # noqa: E731
    cfg = TeachersConfig(
        sd=pretrained(tiny_sd_folder),
        mvdream=pretrained(mv_file, ldm_kwargs=dict(TINY_MV)),
        richdreamer=pretrained(nd_file, ldm_kwargs=dict(TINY_ND), text_encoder=str(clip_l)),
        offload=True,
    )
    _, student = tiny_roles(shared_base=True)
    unet, text = student
    text_fn = lambda prompts: encode_prompts(build_clip_tokenizer(), text, prompts)  # noqa: E731
    base = StudentBase(str(tiny_sd_folder), unet, text, contextlib.nullcontext, text_fn)
    sd, mvd, nd = build_teachers(cfg, (1.0, 1.0, 1.0), 4, device="cpu", student=base)
    ids = lambda *modules: {id(t) for t in _tensors(modules)}  # noqa: E731
    moved = lambda role: {id(t) for t, _ in role.host.slots}  # noqa: E731
    assert sd.keep_resident and sd.host is None  # the student's UNet: never moved
    assert moved(mvd) == ids(mvd.denoiser.unet)  # not the SD teacher's VAE it shares
    assert mvd.branches["mesh"].encode.__self__.vae is sd.denoiser.vae
    assert moved(nd) == ids(nd.denoiser.unet, nd.denoiser.text_encoder)
    assert not (moved(mvd) | moved(nd)) & ids(student, sd.denoiser)
    assert not mvd.host.resident and not nd.host.resident


def test_offload_needs_early_gradients_and_a_pretrained_teacher():
    roles, _ = tiny_roles(shared_base=True)
    branches, _ = renders()
    with pytest.raises(ValueError, match="early_grads=True"):
        score_branches(branches, roles, PROMPTS, 0, torch.Generator(), early_grads=False,
                       offload=True)  # fmt: skip
    oracle = lambda: TeacherSpec(source="oracle")  # noqa: E731
    with pytest.raises(ValueError, match="no enabled teacher has source pretrained"):
        TeachersConfig(sd=oracle(), mvdream=oracle(), richdreamer=oracle(), offload=True)


def _allocated(tensors) -> int:
    """Bytes the CUDA caching allocator counts for ``tensors`` (blocks of 512 bytes)."""
    return sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_drops_by_the_offloaded_bytes():
    roles, student = tiny_roles(shared_base=True)
    for r in roles:
        for m in r.weights:
            m.to("cuda")
    student.to("cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    attach(roles, "cuda")
    torch.cuda.synchronize()
    planned = plan(roles)
    distinct = {id(t): t for ts in planned.values() for t in ts}.values()
    assert before - torch.cuda.memory_allocated() == _allocated(distinct)
    assert all(h.is_pinned() and t.device.type == "cpu" for r in roles[1:] for t, h in r.host.slots)
    assert all(t.is_cuda for t in _tensors([roles[0].denoiser, student]))
    idle = torch.cuda.memory_allocated()
    roles[2].host.to_device()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - idle == _allocated(planned["richdreamer"])
    roles[2].host.to_host()
    assert torch.cuda.memory_allocated() == idle
