"""Every kind of resolution error: its message, its line and column, and its hint."""
import pytest

from plait.ir.dsl import load_file, parse_text
from plait.ir.errors import SpecError

# Line numbers below count from the first line of each text.
MODEL = '''model "m" {
  vocab = 256
  hidden = 128
  attention { heads = 4, kv_heads = 2, rope = rope(theta = 1e4) }
  mlp { ffn = 352 }
  layers = 2 * [attention, mlp]
}
'''
HW = '''device "gpu" { bf16 = 989.5 TFLOP/s, memory = 80 GiB, hbm = 3.35 TB/s }
cluster "c" { nodes = 2, gpus_per_node = 8, device = "gpu", intra = 450 GB/s, inter = 50 GB/s }
'''
JOB_START = 11  # the `train` line of job(...)


def job(body: str) -> str:
    return MODEL + HW + '\ntrain "t" {\n' + body + '\n}\n'


def model_with(old: str, new: str) -> str:
    assert old in MODEL
    return MODEL.replace(old, new)


MOE = model_with("mlp { ffn = 352 }", "moe { experts = 8, top_k = 2, ffn = 64 }").replace("mlp]", "moe]")
MAMBA = model_with("mlp { ffn = 352 }", "mamba { heads = 8, head_dim = 32, groups = 2, state = 16 }").replace(
    "mlp]", "mamba]")

CASES = [
    # (id, text, message, line, col, hint)
    ("kv_heads", model_with("kv_heads = 2", "kv_heads = 3"), "kv_heads (3) must divide heads (4)", 4, 37,
     "grouped-query"),
    ("top_k", MOE.replace("top_k = 2", "top_k = 9"), "top_k (9) exceeds experts (8)", 5, 30, None),
    ("groups", MOE.replace("ffn = 64", "ffn = 64, groups = 3"), "groups (3) must divide experts (8)", 5, 52,
     "equal groups"),
    ("topk_groups", MOE.replace("ffn = 64", "ffn = 64, groups = 4, topk_groups = 5"),
     "topk_groups (5) exceeds groups (4)", 5, 69, None),
    ("eligible", MOE.replace("top_k = 2", "top_k = 3").replace("ffn = 64", "ffn = 64, groups = 4, topk_groups = 1"),
     "top_k (3) exceeds the 2 experts in the best topk_groups (1) groups of 2", 5, 30, None),
    ("shared_gate", MOE.replace("ffn = 64", "ffn = 64, shared_gate = true"), "shared_gate needs a shared expert",
     5, 57, "shared_ffn"),
    ("window_zero", model_with("1e4) }", "1e4), window = 0 }"), "window must be at least 1, got 0", 4, 75,
     None),
    ("window_fraction", model_with("1e4) }", "1e4), window = 16.5 }"), "window must be an integer", 4, 75,
     None),
    ("full_layers_past_the_end", model_with("1e4) }", "1e4), window = 16, full_layers = [2] }"),
     "full_layers names attention layer 2, but the model has 2 attention layers (0 to 1)", 4, 93, None),
    ("full_layers_everywhere", model_with("1e4) }", "1e4), window = 16, full_layers = [0, 1] }"),
     "full_layers lists all 2 attention layers: the window is never used", 4, 79, "drop window"),
    ("full_layers_twice", model_with("1e4) }", "1e4), window = 16, full_layers = [0, 0] }"),
     "attention layer 0 is listed twice in full_layers", 4, 97, None),
    ("full_layers_without_window", model_with("1e4) }", "1e4), full_layers = [1] }"),
     "full_layers without a window", 4, 66, "add window"),
    ("full_layers_not_a_list", model_with("1e4) }", "1e4), window = 16, full_layers = 1 }"),
     "full_layers must be a list of attention layer indices", 4, 93, None),
    ("mamba_groups", MAMBA.replace("groups = 2", "groups = 3"),
     "mamba heads (8) must be divisible by groups (3)", 5, 46, None),
    ("expand", MAMBA.replace("state = 16", "state = 16, expand = 3"),
     "expand (3) disagrees with heads * head_dim / hidden (8 * 32 / 128 = 2)", 5, 70, "drop expand"),
    ("pattern_symbol", MAMBA.replace("layers = 2 * [attention, mamba]", 'pattern = "M*X"'),
     "unknown pattern symbol 'X'", 6, 16, "M mamba"),
    ("undefined_block", model_with("2 * [attention, mlp]", "[attention, mlp, moe]"),
     "layers use 'moe' but the model defines no moe block", 6, 12, "add moe"),
    ("unused_block", model_with("2 * [attention, mlp]", "[attention]"),
     "the mlp block is defined but no layer uses it", 5, 3, "remove the block"),
    ("unknown_kind", model_with("[attention, mlp]", "[attention, mpl]"), "unknown block kind 'mpl'", 6, 28,
     "did you mean 'mlp'"),
    ("unknown_key", model_with("ffn = 352", "fnn = 352"), "unknown key 'fnn' in mlp block", 5, 9,
     "did you mean 'ffn'"),
    ("unknown_model_key", model_with("hidden = 128", "hidden = 128, hiden = 3"), "unknown key 'hiden'", 3, 17,
     "did you mean 'hidden'"),
    ("unit_kind", HW.replace("memory = 80 GiB", "memory = 80 GB/s"),
     "memory must be a size in bytes (e.g. 80 GiB), got GB/s (bandwidth)", 1, 47, None),
    ("unit_missing", HW.replace("hbm = 3.35 TB/s", "hbm = 3.35"), "hbm needs a unit", 1, 61, "TB/s"),
    ("unit_on_integer", model_with("vocab = 256", "vocab = 256 GiB"), "vocab must be an integer", 2, 11, None),
    ("not_integer", model_with("heads = 4", "heads = 4.5"), "heads must be an integer, got 4.5", 4, 23, None),
    ("at_least_one", model_with("heads = 4", "heads = 0"), "heads must be at least 1, got 0", 4, 23, None),
    ("too_large", model_with("vocab = 256", "vocab = 1e30"), "vocab = 1e30 is too large", 2, 11, None),
    ("out_of_range", model_with("theta = 1e4", "theta = 1e999"), "theta = 1e999 is out of range", 4, 60, None),
    ("boolean", model_with("kv_heads = 2", "kv_heads = 2, qkv_bias = 1"), "qkv_bias must be true or false", 4,
     51, None),
    ("enum", model_with("ffn = 352", "ffn = 352, activation = swiglo"), "activation must be one of", 5, 33,
     "did you mean 'swiglu'"),
    ("quoted_enum", model_with("ffn = 352", 'ffn = 352, activation = "gelu"'), "activation must be one of", 5,
     33, "without quotes"),
    ("duplicate_key", model_with("hidden = 128", "hidden = 128\n  hidden = 64"), "duplicate key 'hidden'", 4, 3,
     "already set on line 3"),
    ("duplicate_decl", MODEL + MODEL, 'duplicate model "m"', 8, 7, "first declared at <string>:1"),
    ("missing_field", model_with("heads = 4, kv_heads = 2, ", ""), "attention block is missing 'heads'", 4, 3,
     "add heads = <integer>"),
    ("missing_rope", model_with(", rope = rope(theta = 1e4)", ""), "attention block is missing 'rope'", 4, 3,
     "rope = none"),
    ("missing_layers", model_with("  layers = 2 * [attention, mlp]\n", ""), 'model "m" is missing \'layers\'', 1,
     1, "pattern"),
    ("layers_and_pattern", model_with("layers = 2 * [attention, mlp]", 'layers = [attention, mlp] pattern = "*-"'),
     "give either layers or pattern, not both", 6, 29, None),
    ("block_as_value", model_with("mlp { ffn = 352 }", "mlp = 3"), "'mlp' is a block", 5, 3, None),
    ("value_as_block", model_with("vocab = 256", "vocab { }"), "'vocab' takes a value", 2, 3, None),
    ("rope_scaling", model_with("theta = 1e4", "theta = 1e4, scaling = yarm(factor = 2)"),
     "scaling must be one of linear(...), yarn(...), llama3(...)", 4, 75, "did you mean 'yarn'"),
    ("norm", model_with("hidden = 128", "hidden = 128, norm = batchnorm"), "norm must be rmsnorm", 3, 24, None),
    ("learned_positions", model_with("hidden = 128", "hidden = 128, learned_positions = true"),
     "learned_positions needs max_seq", 3, 17, "max_seq"),
    ("too_many_layers", model_with("2 * [attention, mlp]", "100000 * [attention, mlp]"),
     "100000 * 2 layers is more than 100000", 6, 12, None),
    ("declaration_kind", MODEL.replace("model", "modle"), "unknown declaration 'modle'", 1, 1,
     "did you mean 'model'"),
    ("device_not_found", HW.replace('device = "gpu"', 'device = "gpv"'), 'no device named "gpv"', 2, 54,
     "did you mean 'gpu'"),
    ("device_as_name", HW.replace('device = "gpu"', "device = gpu"), "device must name a device declaration", 2,
     54, 'device = "gpu"'),
    ("model_not_found", job('model = "n", global_batch = 8, seq_len = 64'), 'no model named "n"', JOB_START + 1,
     9, "known models: m"),
    ("cluster_not_found", job('model = "m", cluster = "cc", global_batch = 8, seq_len = 64'),
     'no cluster named "cc"', JOB_START + 1, 24, "did you mean 'c'"),
    ("layout_key", job('model = "m", global_batch = 8, seq_len = 64\nlayout { tpp = 2 }'),
     "unknown key 'tpp' in layout block", JOB_START + 2, 10, "did you mean 'tp'"),
    ("layout_value", job('model = "m", global_batch = 8, seq_len = 64\nlayout { tp = "2" }'),
     "tp must be an integer", JOB_START + 2, 15, None),
    ("layout_order", job('model = "m", global_batch = 8, seq_len = 64\nlayout { order = "tp-dp" }'),
     'order "tp-dp" must arrange tp, cp, ep, dp, pp', JOB_START + 2, 18, "tp-cp-ep-dp-pp"),
    ("gpus", job('model = "m", cluster = "c", gpus = 12, global_batch = 8, seq_len = 64'),
     "gpus (12) is not a multiple of gpus_per_node (8)", JOB_START + 1, 36, "use 8 or 16"),
    ("seq_len", job('model = "m", global_batch = 8, seq_len = 64').replace("hidden = 128", "hidden = 128\n"
     "  max_seq = 32"), "seq_len (64) exceeds the model's max_seq (32)", JOB_START + 2,
     42, "raise max_seq"),
    ("moe_on_dense", job('model = "m", global_batch = 8, seq_len = 64\nmoe { dropless = true }'),
     'model "m" has no moe layers', JOB_START + 2, 1, None),
    ("precision", job('model = "m", global_batch = 8, seq_len = 64, precision = bf61'),
     "precision must be bf16, fp32, fp8", JOB_START + 1, 58, "did you mean 'bf16'"),
    ("fp8_recipe", job('model = "m", global_batch = 8, seq_len = 64, precision = fp8(recipe = late)'),
     "recipe must be one of delayed, tensorwise, blockwise, mxfp8", JOB_START + 1, 71, None),
    ("fp8_no_fp8_layer", job('model = "m", global_batch = 8, seq_len = 64, precision = fp8'),
     "keeps the first 4 and last 4 layers' GEMMs in bf16, which leaves none of the model's 4 layers in fp8",
     JOB_START + 1, 58, "fp8(bf16_ends = N)"),
    ("fp8_bf16_ends", job('model = "m", global_batch = 8, seq_len = 64, precision = fp8(bf16_ends = -1)'),
     "bf16_ends must be", JOB_START + 1, 74, None),
    ("fp8_ends_twice", job('model = "m", global_batch = 8, seq_len = 64, '
                           'precision = fp8(bf16_ends = 1, skip_first = 1)'),
     "give bf16_ends or skip_first / skip_last, not both", JOB_START + 1, 62, None),
    ("betas", job('model = "m", global_batch = 8, seq_len = 64, optimizer = adamw(betas = 0.9)'),
     "betas must be a list of two numbers", JOB_START + 1, 72, None),
    ("data", job('model = "m", global_batch = 8, seq_len = 64, data = 3'), 'data must be "path"', JOB_START + 1,
     53, None),
    ("missing_job_field", job('model = "m", seq_len = 64'), "train \"t\" is missing 'global_batch'",
     JOB_START, 1, None),
]
MOE_JOB_CASES = [
    ("capacity_and_dropless", "moe { capacity_factor = 1.0, dropless = true }",
     "give capacity_factor or dropless = true, not both", 30, None),
    ("pad_without_capacity", "moe { pad_to_capacity = true }", "pad_to_capacity needs a capacity_factor", 7, None),
    ("dropless_false", "moe { dropless = false }", "dropless = false needs a capacity_factor", 7,
     "capacity_factor = 1.0"),
    ("negative_bias_rate", "moe { expert_bias_rate = -0.1 }", "expert_bias_rate", 26, None),
]


def spec_error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_text(text)
    return info.value


@pytest.mark.parametrize("name, text, message, line, col, hint", CASES, ids=[c[0] for c in CASES])
def test_resolution_error(name, text, message, line, col, hint):
    e = spec_error(text)
    assert message in e.message
    assert (e.line, e.col) == (line, col), e.format()
    assert e.source_line == text.splitlines()[line - 1]
    if hint is not None:
        assert hint in (e.hint or ""), e.format()


@pytest.mark.parametrize("name, block, message, col, hint", MOE_JOB_CASES, ids=[c[0] for c in MOE_JOB_CASES])
def test_moe_option_errors(name, block, message, col, hint):
    text = MOE + f'train "t" {{ model = "m", global_batch = 8, seq_len = 64\n{block} }}'
    e = spec_error(text)
    assert message in e.message
    assert (e.line, e.col) == (9, col), e.format()
    if hint:
        assert hint in e.hint


def test_error_format_shows_file_line_col_caret_and_hint():
    e = spec_error(model_with("ffn = 352", "fnn = 352"))
    assert e.format().splitlines() == [
        "<string>:5:9: error: unknown key 'fnn' in mlp block",
        "    mlp { fnn = 352 }",
        "          ^",
        "  hint: did you mean 'ffn'?",
    ]


def test_use_cycle_names_the_cycle(tmp_path):
    (tmp_path / "a.plait").write_text('use "b.plait"\n' + MODEL)
    (tmp_path / "b.plait").write_text('\n\nuse "c.plait"\n')
    (tmp_path / "c.plait").write_text('use "a.plait"\n')
    with pytest.raises(SpecError) as info:
        load_file(str(tmp_path / "a.plait"))
    e = info.value
    assert e.message.startswith("`use` cycle: ")
    chain = [part.rsplit("/", 1)[-1] for part in e.message.split(": ", 1)[1].split(" -> ")]
    assert chain == ["a.plait", "b.plait", "c.plait", "a.plait"]
    assert (e.file, e.line, e.col) == (str(tmp_path / "c.plait"), 1, 5)


def test_use_of_a_missing_file(tmp_path):
    (tmp_path / "a.plait").write_text('# header\nuse "nope/x.plait"\n')
    with pytest.raises(SpecError) as info:
        load_file(str(tmp_path / "a.plait"))
    e = info.value
    assert 'cannot use "nope/x.plait": no such file' in e.message
    assert (e.line, e.col) == (2, 5) and str(tmp_path / "nope" / "x.plait") in e.hint


def test_errors_in_used_files_point_into_those_files(tmp_path):
    (tmp_path / "m.plait").write_text(model_with("ffn = 352", "ffn = -3"))
    (tmp_path / "j.plait").write_text('use "m.plait"\ntrain "t" { model = "m", global_batch = 1, seq_len = 8 }')
    with pytest.raises(SpecError) as info:
        load_file(str(tmp_path / "j.plait"))
    assert info.value.file == str(tmp_path / "m.plait") and (info.value.line, info.value.col) == (5, 15)


def test_negative_mamba_dt_min_points_at_it():
    text = ('model "h" {\n  vocab = 64\n  hidden = 32\n'
            '  mamba { heads = 4, head_dim = 8, groups = 1, state = 8, dt_min = -1e-3 }\n'
            '  layers = 2 * [mamba]\n}\n')
    e = spec_error(text)
    assert "dt_min" in e.message and (e.line, e.col) == (4, 68), e.format()
