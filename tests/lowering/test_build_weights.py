"""Weight import: safetensors files, per-rank shard reads, per-expert vs fused layouts, errors."""
import pytest
import torch
from safetensors.torch import save_file

from plait.ir.errors import PlaitError
from plait.ir.model import MLP, Attention, ModelSpec, MoE, Rope
from plait.lowering.build import build_model
from plait.lowering.weights import SafetensorsSource, load_hf_weights, open_source

torch.set_num_threads(1)

SPEC = ModelSpec(name="t", vocab=64, hidden=32, layers=("attention", "mlp"), max_seq=64,
                 attention=Attention(heads=4, kv_heads=2, head_dim=8, rope=Rope()), mlp=MLP(ffn=48))


def hf_llama_state(seed=0):
    """A llama-named state dict made from a reference model (the parity tests pin the names)."""
    ref = build_model(SPEC, seed=seed)
    sd = {"model.embed_tokens.weight": ref.embed.weight, "model.norm.weight": ref.final_norm.weight,
          "lm_head.weight": ref.head.weight,
          "model.layers.0.input_layernorm.weight": ref.layers[0].norm.weight,
          "model.layers.0.post_attention_layernorm.weight": ref.layers[1].norm.weight}
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        sd[f"model.layers.0.self_attn.{n}.weight"] = getattr(ref.layers[0].mixer, n).weight
    for n in ("gate_proj", "up_proj", "down_proj"):
        sd[f"model.layers.0.mlp.{n}.weight"] = getattr(ref.layers[1].mixer, n).weight
    return ref, {k: v.detach().clone().contiguous() for k, v in sd.items()}


def test_safetensors_files_load_like_the_state_dict(tmp_path):
    ref, sd = hf_llama_state()
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:5]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in names[5:]}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    m = build_model(SPEC, seed=7)
    loaded = load_hf_weights(m, tmp_path, SPEC)  # model_type read from config.json
    assert len(loaded) == len(dict(m.named_parameters()))
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_shard_reads_only_the_rank_slice(tmp_path, monkeypatch):
    ref, sd = hf_llama_state()
    save_file(sd, tmp_path / "model.safetensors")
    reads = []
    original = SafetensorsSource.read
    monkeypatch.setattr(SafetensorsSource, "read",
                        lambda self, name, index: reads.append((name, index)) or original(self, name, index))

    def column_half(name, shape):  # rank 1 of a TP2 column split of q_proj, full tensors otherwise
        return (slice(shape[0] // 2, shape[0]),) if name.endswith("q_proj.weight") else None

    q = torch.empty(16, 32)
    load_hf_weights({"layers.0.mixer.q_proj.weight": q}, tmp_path / "model.safetensors", SPEC, "llama",
                    shard=column_half)
    assert torch.equal(q, ref.layers[0].mixer.q_proj.weight[16:])
    assert reads == [("model.layers.0.self_attn.q_proj.weight", (slice(16, 32), slice(0, 32)))]


def test_shard_with_slice_lists_concatenates_pieces():
    ref, sd = hf_llama_state()
    # rows 0:4 and 24:32 of gate_proj, columns 8:16
    out = torch.empty(12, 8)
    load_hf_weights({"layers.1.mixer.gate_proj.weight": out}, sd, SPEC, "llama",
                    shard=lambda n, s: ([slice(0, 4), slice(24, 32)], slice(8, 16)))
    w = ref.layers[1].mixer.gate_proj.weight
    assert torch.equal(out, torch.cat([w[0:4, 8:16], w[24:32, 8:16]]))


def test_rename_maps_program_names_to_reference_names():
    ref, sd = hf_llama_state()
    out = torch.empty(32, 32)
    load_hf_weights({"stage0.q": out}, sd, SPEC, "llama", rename=lambda n: "layers.0.mixer.q_proj.weight")
    assert torch.equal(out, ref.layers[0].mixer.q_proj.weight)


def test_per_expert_checkpoint_equals_fused_layout():
    spec = ModelSpec(name="m", vocab=64, hidden=32, layers=("attention", "moe"),
                     attention=Attention(4, 2, 8, rope=Rope()), moe=MoE(experts=4, top_k=2, ffn=16))
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, 16, generator=g)
    per_expert = {}
    for e in range(4):
        per_expert[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] = gate_up[e, :16]
        per_expert[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"] = gate_up[e, 16:]
        per_expert[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"] = down[e]
    fused = {"model.layers.0.mlp.experts.gate_up_proj": gate_up, "model.layers.0.mlp.experts.down_proj": down}
    for source in (fused, per_expert):
        a, b = torch.empty(4, 32, 32), torch.empty(4, 32, 16)
        load_hf_weights({"layers.1.mixer.experts.w_gate_up": a, "layers.1.mixer.experts.w_down": b},
                        source, spec, "mixtral")
        assert torch.equal(a, gate_up) and torch.equal(b, down)
    # an EP x ETP shard: experts 2..3, gate rows 8:16 and up rows 24:32 (ETP2 rank 1 of a fused gate_up)
    shard = torch.empty(2, 16, 32)
    load_hf_weights({"layers.1.mixer.experts.w_gate_up": shard}, per_expert, spec, "mixtral",
                    shard=lambda n, s: (slice(2, 4), [slice(8, 16), slice(24, 32)]))
    assert torch.equal(shard, torch.cat([gate_up[2:4, 8:16], gate_up[2:4, 24:32]], dim=1))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(PlaitError, match="nowhere.safetensors"):
        open_source(tmp_path / "nowhere.safetensors")


def test_missing_tensor_and_shape_mismatch_name_the_tensor():
    _, sd = hf_llama_state()
    m = build_model(SPEC)
    with pytest.raises(PlaitError, match="layers.0.mixer.k_proj.weight"):
        load_hf_weights(m, {k: v for k, v in sd.items() if "k_proj" not in k}, SPEC, "llama")
    bad = dict(sd, **{"model.layers.0.self_attn.v_proj.weight": torch.zeros(8, 32)})
    with pytest.raises(PlaitError, match=r"v_proj.weight.*\(8, 32\).*\(16, 32\)"):
        load_hf_weights(m, bad, SPEC, "llama")
    with pytest.raises(PlaitError, match="model type 'gpt2'"):
        load_hf_weights(m, sd, SPEC, "gpt2")
