"""Test-wide settings: one torch thread per process (CI boxes have 2 shared cores)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def randomize_trainable():
    """A function that overwrites a model's trainable tensors, in place, with seeded noise
    of std ``scale`` (adapters away from their zero init) and returns the model."""

    def fill(model, seed: int, scale: float = 0.01):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        return model

    return fill
