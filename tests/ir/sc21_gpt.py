"""The SC'21 GPT family (Narayanan et al., Table 1) as IR, shared by the counts tests."""
import csv

from plait.ir.model import MLP, Attention, ModelSpec, Norm
from plait.reference import reference_file



def gpt(h: int, layers: int, heads: int, vocab: int = 51200, seq: int = 2048) -> ModelSpec:
    """Layernorm, learned positions, biases everywhere, gelu MLP of 4h, output tied to the input."""
    return ModelSpec(
        name=f"gpt-{h}", vocab=vocab, hidden=h, layers=("attention", "mlp") * layers,
        norm=Norm("layernorm"), tie_embeddings=True, max_seq=seq, learned_positions=True,
        attention=Attention(heads, heads, h // heads, qkv_bias=True, out_bias=True),
        mlp=MLP(4 * h, activation="gelu", bias=True))


def sc21_rows() -> list[dict]:
    path = reference_file("megatron_sc21_table1.csv")
    rows = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(rows))
