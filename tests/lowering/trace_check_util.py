"""Shared by the test_build_* files: a model and its torch.fx trace agree bit for bit."""
import torch
import torch.fx


def traced_and_checked(model, tokens):
    """symbolic_trace ``model``; assert the traced GraphModule gives the identical loss and
    identical gradients for every parameter; return the GraphModule."""
    gm = torch.fx.symbolic_trace(model)
    loss, traced = model(tokens, tokens), gm(tokens, tokens)
    assert torch.equal(loss, traced)
    loss.backward()
    traced.backward()
    traced_params = dict(gm.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, traced_params[name].grad), name
    return gm


def call_function_names(gm):
    return [getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function"]
