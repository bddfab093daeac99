"""The AdamW the runtime steps (ir/counts/optimizer.py adamw_path) and the stack fact that prices it
come from one function; torch's fused kernel agrees with the single-tensor loop to rounding and
gives a flat ZeRO-1 shard exactly the bits the whole tensor gets."""
import pytest
import torch

from plait.ir import counts
from plait.ir.cluster import LOCAL_CPU_DEVICE
from plait.ir.job import Optimizer
from plait.runtime.adamw import adamw, fresh_step, optimizer_path, param_groups

SPEC = Optimizer(lr=1e-3, weight_decay=0.1, eps=1e-8)
STEPS = 3


def _params(dtype, sizes=((33, 7), (5,), (129,), (1, 1))):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype) for s in sizes]


def _grads(params, step):
    """Gradients over nine decades, down to the size of eps, where Adam's update is most
    sensitive to rounding (d update / d g ~ 1 / eps)."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype)
            * 10.0 ** torch.randint(-8, 1, p.shape, generator=g).to(p.dtype) for p in params]


def _train(start, grads=None, flat=False, **kind):
    """``start`` after STEPS AdamW steps on ``grads`` (per step, per parameter; default _grads);
    ``flat``: one decayed group, as a ZeRO-1 flat shard of matrices is."""
    grads = grads or [_grads(start, step) for step in range(STEPS)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    groups = ([{"params": params, "weight_decay": SPEC.weight_decay}] if flat else
              param_groups([(str(i), p) for i, p in enumerate(params)], SPEC.weight_decay))
    opt = torch.optim.AdamW(groups, lr=SPEC.lr, eps=SPEC.eps, **kind)
    for step in range(STEPS):
        for p, g in zip(params, grads[step]):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


def test_the_runtime_and_the_stack_fact_read_one_choice():
    params = _params(torch.float32)
    opt = adamw(param_groups([(str(i), p) for i, p in enumerate(params)], 0.1), SPEC)
    path = counts.adamw_path("cpu")
    assert path.kernel == "fused" and opt.defaults["fused"] and not opt.defaults["foreach"]
    assert opt.plait_path == optimizer_path(params) == path
    assert path.step_bytes == counts.ADAMW_STEP_BYTES["fused"] + counts.CLIP_BYTES == 40
    # the stack facts that price plait's runtime on this CPU
    assert dict(LOCAL_CPU_DEVICE.calibration)["optimizer_bytes"] == path.step_bytes
    from plait.ir.dsl import load_job
    job = load_job("specs/jobs/tiny-local.plait")
    assert dict(job.cluster.device.calibration)["optimizer_bytes"] == path.step_bytes
    from plait.planner.explain import optimizer_fact
    assert "plait's runtime, global-norm clip + torch's fused AdamW" in optimizer_fact(job)


def test_fallbacks_are_explicit():
    assert counts.adamw_path("cuda").kernel == "fused"
    assert counts.adamw_path("cuda", floating=False).kernel == "foreach"
    other = counts.adamw_path("tpu")
    assert other.kernel == "single-tensor" and "no fused AdamW on tpu" in other.reason
    assert other.step_bytes == 80 + counts.CLIP_BYTES


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_single_tensor_adamw_to_rounding(dtype):
    """Per step each entry differs by the rounding of the parameter (one ulp of |p|) and of the
    update lr * m / (sqrt(v) + eps) (a few ulps relative, and the update is at most ~lr): bound
    4 eps (|p| + lr) per step. Measured: 2.4 eps |p| at most, on a few entries."""
    start = _params(dtype)
    fused, single = _train(start, fused=True), _train(start, foreach=False)
    eps = torch.finfo(dtype).eps
    for f, s, p in zip(fused, single, start):
        bound = STEPS * 4 * eps * (p.abs() + SPEC.lr)
        assert torch.all((f - s).abs() <= bound), float(((f - s).abs() / bound).max())
        assert not torch.equal(f, p)  # it stepped


def test_a_flat_shard_steps_to_the_bits_of_the_whole():
    """ZeRO-1's shards cut a flat buffer anywhere: the fused kernel's vectorised body and scalar
    tail must give each element the same bits wherever the cut falls."""
    whole = _params(torch.float32, sizes=((1021,),))
    grads = [_grads(whole, step) for step in range(STEPS)]
    want = _train(whole, grads, flat=True, fused=True)[0]
    for cut in (1, 7, 8, 15, 16, 17, 500, 1020):
        pieces = _train([whole[0][:cut], whole[0][cut:]],
                        [[g[0][:cut], g[0][cut:]] for g in grads], flat=True, fused=True)
        assert torch.equal(torch.cat(pieces), want), cut


def test_a_fresh_step_counter_is_the_one_a_first_step_creates():
    """Checkpoint loads fill the counter _adam_state creates before any step: same dtype and
    device as the optimizer's own (the fused kernel reads it on the parameters' device)."""
    for kind in ({"fused": True}, {"foreach": False}):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], **kind)
        made = fresh_step(opt, p)
        p.grad = torch.ones(3)
        opt.step()
        step = opt.state[p]["step"]
        assert (made.dtype, made.device, made.shape) == (step.dtype, step.device, step.shape)


def test_fused_adamw_steps_fsdp2_dtensor_shards(tmp_path):
    """FSDP2's parameters are DTensors: the fused kernel runs on them (one gloo rank)."""
    from torch.distributed.fsdp import fully_shard

    from plait.runtime import mesh as mesh_mod
    mesh_mod.init_distributed("gloo", 60, f"file://{tmp_path}/rdzv", 0, 1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 5)
        start = [p.detach().clone() for p in model.parameters()]
        fully_shard(model)
        opt = adamw(param_groups(model.named_parameters(), 0.1), SPEC)
        assert opt.defaults["fused"]
        model(torch.randn(4, 6)).square().sum().backward()
        grads = [p.grad.full_tensor().clone() for p in model.parameters()]
        opt.step()
        got = [p.full_tensor() for p in model.parameters()]
    finally:
        mesh_mod.destroy()
    params = [torch.nn.Parameter(p) for p in start]
    ref = torch.optim.AdamW(param_groups(zip("wb", params), 0.1), lr=SPEC.lr, eps=SPEC.eps,
                            foreach=False)
    for p, g in zip(params, grads):
        p.grad = g
    ref.step()
    eps = torch.finfo(torch.float32).eps
    for a, b, p in zip(got, params, start):
        assert torch.all((a - b.detach()).abs() <= 4 * eps * (p.abs() + SPEC.lr))


def test_plait_doctor_names_the_adamw_path(capsys):
    from plait.cli import main

    assert main(["doctor", "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "optimizer: torch AdamW, fused (torch's fused AdamW kernel runs on cpu)" in out
    assert f"{counts.adamw_path('cpu').step_bytes} bytes per parameter" in out
