"""A score-distillation teacher: role + frozen denoiser + guidance loss, wired explicitly.

One ``forward`` (the ``Teacher`` protocol of ``teachers.base``):
1. the role selects and packs the views at the teacher's resolution (n, C, h, w) in [-1, 1];
   a latent teacher's ``encode`` maps them to latents with gradients, its random numbers
   from the teacher's generator (pixel-space teachers: identity);
2. timesteps are drawn per object (or per batch) and shared by the views of an object;
3. x_t = alpha_t sg(x) + sigma_t noise; the denoiser predicts conditional and unconditional
   (the negative prompt's) eps in one batch (ASD adds the conditional eps at its later
   timestep);
4. the configured loss turns them into a scalar with a closed-form gradient w.r.t. x;
5. a latent teacher with ``latent_grad`` "decoder" hands the image D(z) - D(z - g) for
   its latents' gradient g instead of back-propagating g through the encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from renderers.cameras import Cameras
from teachers import guidance as G
from teachers.base import Denoiser, GuidanceOut, Views, assert_frozen
from teachers.noise import NoiseSchedule
from teachers.roles import Role


def _cat_cond(a, b):
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    return list(a) + list(b)


class DistillationTeacher(torch.nn.Module):
    """A frozen teacher; see the module docstring for the steps of ``forward``.

    role: packs Views (``teachers.roles``); denoiser: the frozen eps model (an nn.Module is
    registered and asserted frozen); guidance: loss and schedules; resolution: the teacher's
    image size; encode(image, generator) / decode(x): image [-1, 1] <-> model space for
    latent teachers (None: pixel space); schedule: DDPM noise schedule (SD's by default);
    negative_prompt: the unconditional branch's prompt of CFG ("" is the unconditional one).

    Teachers of one role on several render branches share one denoiser: each registers the
    same module, so the weights exist once.
    """

    def __init__(
        self,
        name: str,
        role: Role,
        denoiser: Denoiser,
        guidance: G.GuidanceConfig,
        resolution: int,
        schedule: NoiseSchedule | None = None,
        encode: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        decode: Callable[[Tensor], Tensor] | None = None,
        negative_prompt: str = "",
    ):
        super().__init__()
        if resolution < 1:
            raise ValueError(f"teacher {name!r}: resolution must be positive, got {resolution}")
        if (encode is None) != (decode is None):
            raise ValueError(f"teacher {name!r}: give both encode and decode, or neither")
        self.name = name
        self.role = role
        self.denoiser = denoiser
        self.guidance = guidance
        self.resolution = resolution
        self.schedule = schedule if schedule is not None else NoiseSchedule()
        self.encode = encode
        self.decode = decode
        self.negative_prompt = negative_prompt
        self.requires_grad_(False)
        self.eval()
        assert_frozen(self, name)

    def forward(
        self, views: Views, prompts: list[str], step: int, generator: torch.Generator
    ) -> GuidanceOut:
        cfg, sched, group = self.guidance, self.schedule, self.role.group
        if len(prompts) != views.n_objects:
            raise ValueError(
                f"teacher {self.name!r}: {len(prompts)} prompts for {views.n_objects} objects"
            )
        # 1. Pack the views the teacher scores.
        sel = self.role.select(views)
        image = self.role.encode(sel, self.resolution)
        through_decoder = self.encode is not None and cfg.latent_grad == "decoder"
        if through_decoder:  # the latents are a leaf; step 5 moves their gradient
            with torch.no_grad():
                x = self.encode(image, generator)
            x.requires_grad_(True)
        else:
            x = self.encode(image, generator) if self.encode is not None else image
        n = x.shape[0]
        # 2. Timesteps: one per object (shared by its views) or one per batch; noise.
        t_group = G.sample_timesteps(cfg, step, n // group, generator)
        t = t_group.repeat_interleave(group).to(x.device)
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
        noise = noise.to(x.device)
        scale_cfg = G.guidance_scale_at(cfg, step)
        # 3. Conditional and unconditional eps in one batch; at CFG scale 1 the guided eps
        # is the conditional one and every loss below ignores eps_u, so it is not computed.
        per_image = [p for p in prompts for _ in range(sel.views_per_object)]
        cond = self.denoiser.encode_text(per_image)
        cams = sel.cameras
        with torch.no_grad():
            x_t = sched.add_noise(x.detach(), noise, t)
            if scale_cfg == 1.0:
                eps_c = eps_u = self.denoiser(x_t, t, cond, cams)
            else:
                both = _cat_cond(cond, self.denoiser.encode_text([self.negative_prompt] * n))
                eps = self.denoiser(
                    torch.cat([x_t, x_t]), torch.cat([t, t]), both, Cameras.cat([cams, cams])
                )
                eps_c, eps_u = eps[:n], eps[n:]
        # 4. The loss, normalized to the reference's size (teachers.guidance).
        c = G.loss_scale(x, cfg, len(prompts))
        x0 = None
        if cfg.loss in ("sds", "sds_uniform"):
            uniform = cfg.loss == "sds_uniform"
            loss = G.sds_loss(x, eps_c, eps_u, noise, t, sched, scale_cfg, uniform, c)
        elif cfg.loss == "x0":
            loss, x0 = G.x0_loss(
                x, eps_c, eps_u, noise, t, sched, scale_cfg, group, cfg.recon_std_rescale, c
            )
        else:
            eps_second = eps_c
            if cfg.asd_shift_ratio > 0:
                lo, _ = G.timestep_range(cfg, step)
                t_plus = G.shifted_timesteps(
                    t_group, lo, cfg.asd_shift_ratio, cfg.asd_shift_random, generator, sched.n_steps
                )
                t_plus = t_plus.repeat_interleave(group).to(x.device)
                with torch.no_grad():
                    x_tp = sched.add_noise(x.detach(), noise, t_plus)
                    eps_second = self.denoiser(x_tp, t_plus, cond, cams)
            loss = G.asd_loss(
                x, eps_c, eps_u, eps_second, t, sched, scale_cfg,
                cfg.asd_normalization, cfg.asd_eps, group, c,
            )  # fmt: skip
        # 5. latent_grad "decoder": the latents' gradient reaches the image as a decoded step.
        if through_decoder:
            loss = self._through_decoder(image, x, loss, c)
        with torch.no_grad():
            if x0 is None:
                x0 = sched.x0_from_eps(x_t, G.cfg_eps(eps_c, eps_u, scale_cfg), t)
        return GuidanceOut(loss=loss, x0=x0.detach(), timesteps=t_group, to_image=self._x0_to_image)

    def _through_decoder(self, image: Tensor, z: Tensor, loss: Tensor, c: float) -> Tensor:
        """A loss on ``image`` whose gradient is c (D(z) - D(z - g)), where c g is ``loss``'s
        gradient w.r.t. the latents z: the latent target z - g, decoded, against z decoded."""
        (grad,) = torch.autograd.grad(loss, z)
        if c == 0:
            return (image * 0).sum()
        with torch.no_grad():
            step = self.decode(z) - self.decode(z - grad / c)
        return G.surrogate(image, step, c)

    @torch.no_grad()
    def _x0_to_image(self, x0: Tensor) -> Tensor:
        x = self.decode(x0) if self.decode is not None else x0
        return self.role.to_image(x).detach()
