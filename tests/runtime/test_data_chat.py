"""`plait data prepare --chat`: conversations rendered with a tokenizer's chat template, an SFT
loss mask on the assistant turns, read back by the loader into ignored labels.

The tokenizer is built offline in the test (a word-level `tokenizers` model wrapped as a
transformers fast tokenizer with a ChatML-style template), so nothing is downloaded."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plait.cli import main
from plait.ir.errors import PlaitError
from plait.ir.model import MLP, Attention, ModelSpec, Rope
from plait.lowering.build import build_model
from plait.lowering.modules.model import IGNORE_INDEX
from plait.runtime.data import BatchLoader, MemmapTokens, Packing, prepare

WORDS = ["<unk>", "<eos>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "you",
         "are", "kind", "what", "is", "two", "plus", "four", "?", ".", "thanks", "welcome"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = [
    [{"role": "system", "content": "you are kind"}, {"role": "user", "content": "what is two plus two ?"},
     {"role": "assistant", "content": "four ."}, {"role": "user", "content": "thanks"},
     {"role": "assistant", "content": "you are welcome ."}],
    [{"role": "user", "content": "two plus two ?"}, {"role": "assistant", "content": "four"}],
]


def make_tokenizer(path, template=TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = template
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = make_tokenizer(root / "tok")
    src = root / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 20))
    assert main(["data", "prepare", "--chat", str(src), "-o", str(root / "ds"), "--tokenizer", tok]) == 0
    return root, tok


def test_loss_mask_covers_exactly_the_assistant_turns(chat_data):
    root, _ = chat_data
    data = MemmapTokens(root / "ds")
    first = data.indexed.document_lengths()[0]
    ids, mask = data.window(0, first), data.loss_mask(0, first)
    kept = [WORDS[i] for i, m in zip(ids, mask) if m]
    assert kept == ["four", ".", "<|im_end|>", "you", "are", "welcome", ".", "<|im_end|>"]
    assert WORDS[ids[-1]] == "<eos>" and mask[-1] == 0  # the packing separator is not learned
    from transformers import AutoTokenizer
    want = AutoTokenizer.from_pretrained(chat_data[1]).apply_chat_template(
        CHATS[0], tokenize=True, return_dict=False)
    assert list(ids[:-1]) == list(want)  # the tokens the template itself gives
    assert data.meta["objective"] == "sft" and data.indexed.num_documents == 40
    assert main(["data", "inspect", str(root / "ds")]) == 0  # one dataset (the mask rides along)


def test_the_loader_ignores_masked_labels_and_the_loss_is_the_mean_over_counted_tokens(chat_data):
    root, _ = chat_data
    data = MemmapTokens(root / "ds")
    loader = BatchLoader(data, 16, 4, seed=1, packing=Packing(document_mask=True, loss_mask=True))
    batch = loader.local_batch(0)
    counted = batch.labels != IGNORE_INDEX
    assert 0 < int(counted.sum()) < counted.numel()
    assert batch.loss_scale == counted.numel() / int(counted.sum())
    spec = ModelSpec(name="chat", vocab=len(WORDS), hidden=16, layers=("attention", "mlp"),
                     attention=Attention(heads=2, kv_heads=1, head_dim=8, rope=Rope()), mlp=MLP(ffn=32))
    model = build_model(spec, dtype=torch.float64, document_mask=True, loss_mask=True)
    loss = model(batch.tokens, batch.labels, batch.positions) * batch.loss_scale
    logits = model(batch.tokens, None, batch.positions)
    want = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-12


@pytest.mark.parametrize("lines, message", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "chats.jsonl:1: the conversation has no assistant"),
    ([{"text": "hi"}], "chats.jsonl:1: no conversation under 'messages'"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], "chats.jsonl:1: turn 1 is not"),
])
def test_bad_conversations_are_errors_naming_the_line(chat_data, tmp_path, lines, message):
    _, tok = chat_data
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(PlaitError, match=message):
        prepare([src], tmp_path / "out", tok, "messages", chat=True)
    assert not (tmp_path / "out").exists()  # nothing half-written stays


def test_chat_needs_a_tokenizer_with_a_template(chat_data, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"messages": CHATS[1]}) + "\n")
    with pytest.raises(PlaitError, match="needs a Hugging Face tokenizer"):
        prepare([src], tmp_path / "a", "byte", "messages", chat=True)
    bare = make_tokenizer(tmp_path / "bare", template=None)
    with pytest.raises(PlaitError, match="has no chat template"):
        prepare([src], tmp_path / "b", bare, "messages", chat=True)
    rewriting = make_tokenizer(tmp_path / "rw", template=TEMPLATE.replace(
        "{% for m in messages %}", "{% for m in messages %}{% if loop.length > 1 %}you {% endif %}"))
    with pytest.raises(PlaitError, match="does not render turn 2 as an extension"):
        prepare([src], tmp_path / "c", rewriting, "messages", chat=True)


def test_a_packed_sft_job_trains_on_the_chat_dataset(chat_data, tmp_path):
    """The Trainer (one in-process rank) reads positions and the loss mask from the prepared
    dataset: its step-0 loss is the reference's mean over the counted tokens."""
    from plait.ir.cluster import local_cpu
    from plait.ir.job import Data, Optimizer, TrainJob
    from plait.ir.plan import Layout
    from plait.runtime import mesh as mesh_mod
    from plait.runtime.launch import hand_plan
    from plait.runtime.train import Trainer

    root, _ = chat_data
    spec = ModelSpec(name="chat", vocab=len(WORDS), hidden=16, layers=("attention", "mlp"),
                     attention=Attention(heads=2, kv_heads=1, head_dim=8, rope=Rope()), mlp=MLP(ffn=32))
    job = TrainJob(name="sft", model=spec, cluster=local_cpu(1), global_batch=4, seq_len=16,
                   precision=None, optimizer=Optimizer(lr=1e-3, warmup=1), steps=2,
                   data=Data(path=str(root / "ds"), document_mask=True, objective="sft"))
    mesh_mod.init_distributed("gloo", 60, f"file://{tmp_path}/rdzv", 0, 1)
    try:
        plan = hand_plan(job, Layout())
        trainer = Trainer(job, plan, mesh_mod.build_mesh(plan.layout, 60))
        loss = float(trainer.forward_backward(0))
    finally:
        mesh_mod.destroy()
    batch = trainer.loader.local_batch(0)
    reference = build_model(spec, seed=job.seed, document_mask=True)
    logits = reference(batch.tokens, None, batch.positions)
    want = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
    assert loss == pytest.approx(float(want.detach()), rel=1e-5)
    assert not torch.equal(batch.positions, torch.arange(16).expand(4, 16))  # documents restart
