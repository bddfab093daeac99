"""HF import of sliding windows: per layer, the window plait reads from a config is the one
transformers' model of that config attends with, for every llama-like family's rule (as resolved by
transformers' own config classes); configs a window cannot be read from are errors naming the
field; `plait export hf` writes windows back (the round trip hf_write checks)."""
import pytest

transformers = pytest.importorskip("transformers")

from plait.ir.errors import PlaitError  # noqa: E402
from plait.ir.hf import model_from_hf_config  # noqa: E402
from plait.ir.hf_write import hf_config  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)

CASES = {
    "mistral-default-4096": dict(model_type="mistral"),
    "mistral-none": dict(model_type="mistral", sliding_window=None),
    "mixtral-7": dict(model_type="mixtral", sliding_window=7, num_local_experts=4, num_experts_per_tok=2),
    "qwen2-top-layers": dict(model_type="qwen2", use_sliding_window=True, sliding_window=7,
                             max_window_layers=2),
    "qwen2-unused": dict(model_type="qwen2", use_sliding_window=False, sliding_window=7),
    "qwen2-all-full": dict(model_type="qwen2", use_sliding_window=True, sliding_window=7,
                           max_window_layers=4),
    "qwen3-layer-types": dict(model_type="qwen3", use_sliding_window=True, sliding_window=5,
                              layer_types=["sliding_attention", "full_attention"] * 2),
    "qwen2_moe-even-bottom": dict(model_type="qwen2_moe", use_sliding_window=True, sliding_window=6,
                                  max_window_layers=3, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "qwen3_moe-all": dict(model_type="qwen3_moe", use_sliding_window=True, sliding_window=9,
                          num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
}


def transformers_windows(cfg: dict) -> list:
    """The window each decoder layer of transformers' model attends with (None: full): the Qwen2,
    Qwen3 and Qwen2-MoE models pick each layer's mask by config.layer_types[i] (sliding masks with
    config.sliding_window), Mistral, Mixtral and Qwen3-MoE use config.sliding_window everywhere
    (their modeling files, transformers 5.x)."""
    config = transformers.AutoConfig.for_model(**cfg)
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return [(config.sliding_window or None) if t == "sliding_attention" else None for t in types]


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_layers_window_is_the_one_transformers_attends_with(case):
    cfg = TINY | CASES[case]
    saved = transformers.AutoConfig.for_model(**cfg).to_dict()  # the config.json it would save
    want = transformers_windows(cfg)
    for source in (cfg, saved):
        spec = model_from_hf_config(source)
        assert [spec.attention.window_of(i) for i in range(spec.count("attention"))] == want


def test_the_cases_cover_windowed_full_and_mixed_models():
    seen = {tuple(w is None for w in transformers_windows(TINY | c)) for c in CASES.values()}
    assert {(True,) * 4, (False,) * 4, (True, True, False, False)} <= seen


@pytest.mark.parametrize("case", ["mistral-default-4096", "qwen2-top-layers", "qwen3-layer-types",
                                  "qwen2_moe-even-bottom", "qwen3_moe-all", "mixtral-7"])
def test_export_writes_the_windows_back(case):
    spec = model_from_hf_config(TINY | CASES[case])
    cfg = hf_config(spec, family=CASES[case]["model_type"])  # raises unless it reads back equal
    assert transformers_windows(cfg) == [spec.attention.window_of(i) for i in range(4)]


def test_a_windowed_llama_layout_exports_as_mistral_and_not_as_llama():
    spec = model_from_hf_config(TINY | CASES["mistral-default-4096"])
    assert hf_config(spec)["model_type"] == "mistral"
    with pytest.raises(PlaitError, match="llama configs have no sliding window"):
        hf_config(spec, family="llama")
    mixed = model_from_hf_config(TINY | CASES["qwen2-top-layers"])
    with pytest.raises(PlaitError, match="cannot be written as a mistral config"):
        hf_config(mixed, family="mistral")  # one window for every layer: full_layers cannot be said


@pytest.mark.parametrize("change, field", [
    (dict(model_type="mistral", sliding_window=0), "sliding_window = 0"),
    (dict(model_type="llama", sliding_window=4096), "sliding_window = 4096"),
    (dict(model_type="qwen3", layer_types=["sliding_attention"] * 4), "layer_types"),  # no window
    (dict(model_type="qwen2", use_sliding_window=True, layer_types=["chunked_attention"] * 4),
     "layer_types"),
    (dict(model_type="qwen2", use_sliding_window=True, layer_types=["full_attention"] * 3),
     "layer_types"),
    (dict(model_type="qwen2", use_sliding_window="yes"), "use_sliding_window = 'yes'"),
])
def test_windows_plait_cannot_read_are_named(change, field):
    with pytest.raises(PlaitError) as e:
        model_from_hf_config(TINY | change)
    assert field in e.value.message
