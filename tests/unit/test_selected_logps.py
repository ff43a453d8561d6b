"""The LM-head log-prob op: same value and gradient as ``gather - logsumexp`` (its custom backward)."""

import pytest
import torch

from align.models.logps import selected_token_logps


def reference(logits, targets):
    x = logits.float()
    return x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_and_gradient_match_autograd(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(6, 40)).to(dtype)
    targets = torch.tensor([0, 39, 5, 5, 17, 2])
    weights = torch.randn(6)
    mine = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    out = selected_token_logps(mine, targets)
    want = reference(theirs, targets)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want)
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    assert mine.grad.dtype == dtype
    torch.testing.assert_close(mine.grad, theirs.grad)


def test_gradcheck_float64():
    targets = torch.tensor([1, 0, 8, 3])
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: selected_token_logps(z, targets), (x,))
