"""Micro models for the pruning tests (fp64 so equivalences hold to rounding)."""
from plait.ir.model import MLP, Attention, Mamba2, ModelSpec, MoE, Rope

DENSE = ModelSpec(name="micro-dense", vocab=64, hidden=32, layers=("attention", "mlp") * 2, max_seq=64,
                  attention=Attention(heads=4, kv_heads=2, head_dim=8, rope=Rope()),
                  mlp=MLP(ffn=48, activation="swiglu"))
HYBRID = ModelSpec(name="micro-hybrid", vocab=64, hidden=32, layers=("mamba", "mlp", "mamba", "attention", "mlp"),
                   max_seq=64, attention=Attention(heads=4, kv_heads=2, head_dim=8, rope=None),
                   mlp=MLP(ffn=32, activation="relu2"),
                   mamba=Mamba2(heads=4, head_dim=8, groups=2, state=4, chunk=8))
MOE = ModelSpec(name="micro-moe", vocab=64, hidden=32, layers=("attention", "moe") * 2, max_seq=64,
                attention=Attention(heads=4, kv_heads=2, head_dim=8, rope=Rope()),
                moe=MoE(experts=6, top_k=2, ffn=16, shared_ffn=16, shared_gate=True, router="sigmoid",
                        expert_bias=True))
