"""The legality-and-capability table: its rows (per kind, per level), their arithmetic, and that
each rule is stated there once (no stage keeps a copy of a divisibility check)."""
import ast
from dataclasses import replace
from pathlib import Path

import pytest

from plait.ir import kinds, legality
from plait.ir.dsl import load_job
from plait.ir.errors import LayoutError
from plait.ir.legality import LEGAL, RUNNABLE, Workload
from plait.ir.plan import Layout

ROOT = Path(__file__).resolve().parents[2]


def workload(job_name: str, **model_changes) -> Workload:
    job = load_job(str(ROOT / "specs" / "jobs" / f"{job_name}.plait"))
    return replace(Workload.of_job(job), model=replace(job.model, **model_changes))


def test_the_table_holds_the_rows_of_the_kinds_the_model_uses():
    dense = {r.name for r in legality.table(workload("tiny-local")).rules}
    moe = {r.name for r in legality.table(workload("tiny-moe-local")).rules}
    hybrid = {r.name for r in legality.table(workload("tiny-hybrid-local")).rules}
    assert {"attention-heads-tp", "mlp-ffn-tp", "batch", "vocab-tp"} <= dense
    assert not any(n.startswith(("moe-", "mamba-")) for n in dense)
    assert {"moe-experts-ep", "moe-fsdp-experts"} <= moe and not any(n.startswith("mamba-") for n in moe)
    assert {"mamba-heads-tp", "mamba-conv-halo-cp"} <= hybrid and not any(n.startswith("moe-")
                                                                          for n in hybrid)


def test_every_kind_supplies_rows_with_a_level_and_a_topic():
    for name in kinds.names():
        rows = kinds.facet(name, "rules").RULES
        assert rows, name
        for r in rows:
            assert r.level in legality.LEVELS and r.topic in legality.TOPICS, r.name
            assert r.name.startswith(name + "-"), r.name
    names = [r.name for r in legality.CORE] + [r.name for k in kinds.names()
                                               for r in kinds.facet(k, "rules").RULES]
    assert len(names) == len(set(names))


def test_legal_and_runnable_are_separate_questions():
    t = legality.table(workload("tiny-moe-local"))
    folded_fsdp = Layout(cp=2, dp=4, ep=2, edp=4, dp_kind="fsdp")
    assert t.violations(folded_fsdp, t.select((LEGAL,))) == []  # Megatron-FSDP shards over EDP
    [v] = t.violations(folded_fsdp, t.select((RUNNABLE,)))
    assert v.rule.name == "moe-fsdp-experts"
    assert "edp = 4, dp*cp = 4*2 = 8" in v.message
    with pytest.raises(LayoutError, match=r"plait cannot run this yet \(moe-fsdp-experts\)"):
        t.require(folded_fsdp)
    t.require(folded_fsdp, (LEGAL,))


def test_messages_show_the_arithmetic():
    t = legality.table(workload("tiny-moe-local", moe=replace(load_job(
        str(ROOT / "specs/jobs/tiny-moe-local.plait")).model.moe, experts=6)))
    msgs = [v.message for v in t.violations(Layout(dp=2, ep=4, edp=1, tp=4, sp=True))]
    assert "experts (6) must be divisible by ep (4): 6 % 4 = 2" in msgs
    assert "kv_heads (2) must be divisible by tp (4): 2 % 4 = 2" in msgs


def test_a_pass_asks_only_its_topic():
    t = legality.table(workload("tiny-local"))
    bad_tp_and_batch = Layout(tp=8, mbs=3)  # heads 4 % 8, and 16 % (1*3)
    assert {r.topic for r in t.select(topics=("tensor",))} == {"tensor"}
    assert [v.rule.name for v in t.violations(bad_tp_and_batch, t.select(topics=("tensor",)))] \
        == ["attention-heads-tp", "attention-kv-heads-tp"]
    with pytest.raises(LayoutError, match=r"global batch \(16\) must be divisible by dp\*mbs"):
        t.require(bad_tp_and_batch, topics=("batch",))


def test_one_sequence_parallel_formula_under_context_parallelism():
    t = legality.table(workload("tiny-local"))
    rows = t.select(topics=("sequence",))
    # SP splits a CP rank's tokens: 24 / cp 4 = 6 tokens, 6 % tp 4 = 2 although 24 % 4 = 0
    odd = replace(t.workload, seq_len=24)
    [v] = legality.Table(odd).violations(Layout(tp=4, cp=4, sp=True), rows)
    assert "seq_len/cp = 24/4 = 6 tokens over tp = 4: 6 % 4 = 2" in v.message


# ------------------------------------------------------------------------------------------------
# Each rule is stated once: no `dimension % axis` outside the table
# ------------------------------------------------------------------------------------------------

AXES = {"tp", "cp", "dp", "pp", "ep", "etp", "edp", "vpp", "mbs", "dp_size"}
DIMENSIONS = {"experts", "ffn", "shared_ffn", "heads", "kv_heads", "groups", "vocab",
              "global_batch", "seq_len", "seq", "tokens"}
TABLE_FILES = {Path("ir/legality.py")} | {Path("plait/kinds") / k / "rules.py" for k in kinds.names()}
CORE = ("ir", "planner", "lowering", "runtime", "plait")


def _names(node):
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            yield n.id
        elif isinstance(n, ast.Attribute):
            yield n.attr


def rule_copies(source: str) -> list[str]:
    """`model dimension % layout axis` expressions (experts % ep, ffn % etp, seq % (2*cp), ...)."""
    return [ast.unparse(n) for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mod)
            and set(_names(n.left)) & DIMENSIONS and set(_names(n.right)) & AXES]


def test_the_scanner_finds_a_copied_rule():
    copied = ("def check(spec, lay):\n    if spec.moe.experts % lay.ep:\n        raise ValueError\n"
              "    return job.global_batch % (lay.dp * lay.mbs), (seq // cp) % t.layout.tp\n")
    assert rule_copies(copied) == ["spec.moe.experts % lay.ep",
                                   "job.global_batch % (lay.dp * lay.mbs)",
                                   "seq // cp % t.layout.tp"]
    assert rule_copies("stage = chunk % pp\nrank = (r - t) % cp\n") == []  # index arithmetic


def test_divisibility_rules_are_stated_only_in_the_table():
    copies = []
    for folder in CORE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel not in TABLE_FILES:
                copies += [f"{rel}: {c}" for c in rule_copies(path.read_text())]
    assert copies == [], "ask plait/ir/legality.py instead of restating its rules:\n" + "\n".join(
        copies)
