"""AdamW runs fused on CPU (torch's CPU default is the per-parameter loop) and takes the same step."""

import torch

from align.config.specs import OptimConfig
from align.train.optim import build_optimizer


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))


def test_fused_on_cpu_and_same_update_as_the_loop():
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95])
    fused_model, loop_model = model(), model()
    fused = build_optimizer(fused_model, cfg)
    assert all(g["fused"] for g in fused.param_groups)
    loop = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                              for g in build_optimizer(loop_model, cfg).param_groups],
                             lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)
    ids = torch.tensor([[1, 4, 9, 3]])
    for _ in range(3):
        for m, opt in ((fused_model, fused), (loop_model, loop)):
            opt.zero_grad()
            m(ids).pow(2).sum().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
