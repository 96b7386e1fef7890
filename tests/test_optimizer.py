import torch

from prd.config import load
from prd.train import make_optimizer


def test_adan_takes_a_full_step_on_a_tiny_gradient():
    """The reference's Adan eps 1e-15: a gradient of 1e-12 still moves a weight by about lr
    on the first step (m / sqrt(n) = sign(g)); at the library's eps 1e-8 it would move by
    lr * 1e-4."""
    cfg = load(None, ["train.optimizer=adan", "train.lr=0.1"])
    w = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer(cfg, [w])
    w.grad = torch.tensor([1e-12, -1e-12, 0.0])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, 0.1, 0.0]), rtol=2e-2, atol=1e-9)
