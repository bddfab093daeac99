"""Shared by the test_passes_* files: a tiny dense model (with every optional dense feature the
TP pass must handle: qkv / out / mlp biases, per-head q/k norms) and hand-written plans."""
from plait.ir.model import MLP, Attention, ModelSpec, Rope
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.lowering.build import build_model
from plait.lowering.compile import dense_layout, lower

SPEC = ModelSpec(
    name="pass-test", vocab=256, hidden=64, layers=("attention", "mlp") * 3,
    attention=Attention(heads=4, kv_heads=2, head_dim=16, rope=Rope(), qk_norm=True,
                        qkv_bias=True, out_bias=True),
    mlp=MLP(ffn=96, bias=True))
SEQ = 16


def plan(layout: Layout, stages=None, global_batch: int = 8, schedule: str = "1f1b",
         spec: ModelSpec = SPEC) -> ParallelPlan:
    layout = dense_layout(layout)
    return ParallelPlan(job="t", model=spec.name, cluster="local-cpu", world=layout.world,
                        layout=layout,
                        stages=stages or even_stages(spec.num_layers, layout.pp, layout.vpp),
                        global_batch=global_batch, seq_len=SEQ, schedule=schedule)


def lowered(layout: Layout, rank: int = 0, stages=None, spec: ModelSpec = SPEC, **kw):
    return lower(build_model(spec, seed=0), spec, plan(layout, stages, spec=spec, **kw), rank)


def ops(gm, name: str) -> int:
    """How many plait:: collectives called ``name`` a graph holds."""
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_function" and str(n.target).startswith(f"plait.{name}"))
