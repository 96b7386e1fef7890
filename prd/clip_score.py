"""CLIP score and retrieval R@1 of rendered views against their prompts.

The paper's protocol (Sec. 4, after DreamFusion's R-precision and the CLIP score of
Hessel et al. 2021): a CLIP ViT-B/32 embeds each rendered view and the text
``"A photo depicts " + prompt``; a view's CLIP score is ``2.5 * max(cos, 0)`` between its
image and its own text embedding (reported x 100); R@1 is the share of views whose most
similar text among all prompts of the evaluation set is their own.

The CLIP model is any transformers ``CLIPModel`` folder (``from_pretrained(folder)``, no
hub): config.json + weights, its tokenizer files and preprocessor_config.json. Images go
through the folder's own image processor, PIL backend (the same pixels whether or not
torchvision is installed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TEXT_PREFIX = "A photo depicts "
"""Put before every prompt (the protocol's text, after Hessel et al.'s CLIPScore)."""

CLIP_SCORE_WEIGHT = 2.5
"""w in CLIPScore = w * max(cos, 0) (Hessel et al. 2021)."""

REPORT_SCALE = 100.0
"""CLIP scores are reported x 100 (the paper's table: 68.2 at 415 prompts)."""

_REQUIRED = {
    "config.json": "config.json",
    "weights": "model.safetensors | pytorch_model.bin",
    "tokenizer": "tokenizer.json | vocab.json + merges.txt",
    "image processor": "preprocessor_config.json",
}


def texts_for(prompts: list[str]) -> list[str]:
    """The texts CLIP embeds: ``TEXT_PREFIX + prompt`` for each prompt."""
    return [TEXT_PREFIX + p for p in prompts]


def check_clip_folder(folder: str | Path, what: str = "--clip") -> Path:
    """``folder`` as a Path if it holds a CLIP model, tokenizer and image processor;
    FileNotFoundError / ValueError naming the folder and what is missing otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} {folder}: no such folder (a transformers CLIPModel folder, e.g. "
            "openai/clip-vit-base-patch32 saved locally)"
        )
    present = {p.name for p in folder.iterdir()}
    has = {
        "config.json": "config.json" in present,
        "weights": bool({"model.safetensors", "pytorch_model.bin"} & present),
        "tokenizer": "tokenizer.json" in present or {"vocab.json", "merges.txt"} <= present,
        "image processor": "preprocessor_config.json" in present,
    }
    missing = [f"{k} ({_REQUIRED[k]})" for k, ok in has.items() if not ok]
    if missing:
        raise FileNotFoundError(f"{what} {folder}: missing {', '.join(missing)}")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "clip":
        raise ValueError(
            f"{what} {folder}: config.json has model_type {model_type!r}, expected 'clip'"
        )
    return folder


class ClipEmbedder:
    """A frozen CLIP from a local folder: unit-norm text and image embeddings.

    device: where the model runs (the caller's choice); float32 weights.
    """

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", what="--clip"):
        from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

        self.folder = check_clip_folder(folder, what)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(self.folder)).eval().to(self.device)
        self.model.requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(self.folder))
        self.processor = AutoImageProcessor.from_pretrained(str(self.folder), backend="pil")

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) float32 unit vectors of the texts as given (no prefix added here)."""
        ids = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        pooled = self.model.text_model(**ids).pooler_output
        return _unit(self.model.text_projection(pooled))

    @torch.no_grad()
    def embed_images(self, images: np.ndarray, batch: int = 32) -> torch.Tensor:
        """(N, D) float32 unit vectors of uint8 RGB images (N, H, W, 3), in batches."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            got = f"{images.dtype} {images.shape}"
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {got}")
        out = []
        for i in range(0, len(images), batch):
            pil = [Image.fromarray(im) for im in images[i : i + batch]]
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            out.append(_unit(self.model.visual_projection(pooled)))
        if not out:
            return torch.zeros(0, self.model.config.projection_dim, device=self.device)
        return torch.cat(out)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


@dataclass
class ViewScores:
    """Per view v: cosine to its own text, CLIP score (x 100), top-1 prompt index, hit."""

    cosine: torch.Tensor  # (V,) float
    clip_score: torch.Tensor  # (V,) float, 2.5 * max(cos, 0) * 100
    top1: torch.Tensor  # (V,) long, index of the most similar text
    hit: torch.Tensor  # (V,) bool, top1 == own prompt


def score_views(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: torch.Tensor) -> ViewScores:
    """Scores of V views against P texts.

    image_emb (V, D) and text_emb (P, D) unit vectors; owner (V,) long in [0, P): the
    prompt each view renders. Retrieval ranks all P texts (ties: the lower index wins).
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embeddings (V, D) and (P, D), got {image_emb.shape}, {text_emb.shape}")
    owner = owner.to(image_emb.device).long()
    if len(owner) != len(image_emb):
        raise ValueError(f"owner has {len(owner)} entries for {len(image_emb)} views")
    sim = image_emb @ text_emb.T  # (V, P)
    own = sim.gather(1, owner[:, None])[:, 0]
    top1 = sim.argmax(dim=1)
    return ViewScores(
        cosine=own,
        clip_score=CLIP_SCORE_WEIGHT * own.clamp_min(0.0) * REPORT_SCALE,
        top1=top1,
        hit=top1 == owner,
    )
