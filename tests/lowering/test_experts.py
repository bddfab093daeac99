"""The routed experts' loop path (lowering/modules/experts.py) against one matmul per expert on its
own weight tensor: the same outputs and gradients, bit for bit, with an expert that gets no
tokens."""
import torch
import torch.nn.functional as F

from plait.lowering.modules.experts import grouped_linear


def test_loop_path_equals_separate_expert_weights_bitwise():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    w = torch.randn(4, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(int(counts.sum()), 8, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(int(counts.sum()), 6, generator=gen, dtype=torch.float64)
    grouped_linear(x, counts, w).backward(grad_out)  # the loop: grouped_mm is off for float64

    ws = [w[e].detach().clone().requires_grad_() for e in range(4)]
    x_ref = x.detach().clone().requires_grad_()
    pieces = torch.split(x_ref, counts.tolist())
    ref = torch.cat([F.linear(p, we) for p, we in zip(pieces, ws)])
    ref.backward(grad_out)
    assert torch.equal(grouped_linear(x.detach(), counts, w.detach()), ref.detach())
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(w.grad, torch.stack([we.grad for we in ws]))
    assert torch.count_nonzero(w.grad[1]) == 0  # the expert without tokens: a zero gradient
