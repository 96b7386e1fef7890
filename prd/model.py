"""The trainable whole: PETA student + triplane field decoder, one module for DeepSpeed."""

from __future__ import annotations

import torch
from torch import nn

from prd.background import LearnedBackground
from prd.student import PRDStudent, build_student
from prd.triplane import FieldConfig, FieldDecoder, TriplaneField


class PRDModel(nn.Module):
    """Student (text -> per-plane x0 latents -> triplanes), the field MLPs and, when
    learned, the background.

    ``forward`` is one progressive step of the student: noised plane latents in, the clean
    latent estimate and the two triplanes out. The MLPs are applied later, by the renderers,
    through ``field``; the background by both render branches, through ``backdrop``.
    """

    def __init__(
        self,
        student: PRDStudent,
        decoder: FieldDecoder,
        background: LearnedBackground | None = None,
    ):
        super().__init__()
        self.student = student
        self.decoder = decoder
        self.background = background

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor):
        """z_t (B*P, 4, h, w), t (B*P,) long, text (B, L, C) ->
        x0 (B*P, 4, h, w) in z_t's dtype, geometry and texture triplanes (B, 3, C, H, W)
        each in fp32 whatever the base's dtype or an autocast around the call: the field's
        coordinates, SDF and colours are computed from them in fp32 (prd.precision)."""
        x0 = self.student.predict_x0(z_t, t, text)
        geometry, texture = self.student.decode(x0)
        return x0, geometry.float(), texture.float()

    def field(self, geometry: torch.Tensor, texture: torch.Tensor) -> TriplaneField:
        return self.decoder.bind(geometry, texture)

    def backdrop(self, prompts: list[str], text: torch.Tensor, constant: torch.Tensor):
        """What the renders of ``prompts`` (text: their (B, L, C) token states) are
        composited over: the learned background bound to the prompts' pooled embeddings
        (the state at each end-of-text token, CLIP's pooled output), else ``constant``."""
        if self.background is None:
            return constant
        eos = self.student.eos_positions(prompts).to(text.device)
        return self.background.bind(text[torch.arange(len(prompts), device=text.device), eos])


def build_model(cfg, device=None, dtype=torch.float32, seed: int | None = None) -> PRDModel:
    """The model of a ``prd.config.Config``: student per cfg.student, MLPs per cfg.field.

    seed: when given, random initial weights are drawn as after ``torch.manual_seed(seed)``
    (what ``prd train`` does with ``train.seed`` on rank 0), from a forked RNG so the
    caller's global RNG state is left untouched; None draws from the global RNG as it is.
    Sampling relies on it: the in-code base weights of a run must be rebuilt exactly for
    its exported adapters to load. The field decoder's channel count must equal the
    student's triplane channels."""
    if seed is not None:
        dev = torch.device(device or "cpu")
        cuda = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            return build_model(cfg, device=device, dtype=dtype)
    student = build_student(cfg.student, device=device, dtype=dtype)
    field_cfg: FieldConfig = cfg.field
    if field_cfg.channels != cfg.student.triplane_channels:
        raise ValueError(
            f"field.channels={field_cfg.channels} must equal "
            f"student.triplane_channels={cfg.student.triplane_channels}"
        )
    # trainable parameters stay fp32 whatever the frozen base's dtype
    decoder = FieldDecoder(field_cfg)
    background = None
    if cfg.background.learned:
        background = LearnedBackground(cfg.background, student.text_dim)
    if device is not None:
        decoder = decoder.to(device)
        background = background.to(device) if background is not None else None
    return PRDModel(student, decoder, background)
