"""`plait plot RUN_DIR` and `plait generate SOURCE --prompt`, as a user runs them."""
import json
from pathlib import Path

import pytest
import torch

from plait.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _metrics_run(run_dir: Path, losses, restart_at=None) -> None:
    from plait.ir.dsl import load_job
    from plait.runtime.metrics import MetricsWriter
    from plait.runtime.train import StepLog

    job = load_job(str(ROOT / "specs" / "jobs" / "tiny-local.plait"))
    writer = MetricsWriter(run_dir, job, job.seq_len, job.global_batch, torch.device("cpu"))
    steps = list(range(len(losses))) + (list(range(restart_at, len(losses))) if restart_at else [])
    for step in steps:
        writer.step(StepLog(step=step, loss=losses[step], grad_norm=1.0, lr=1e-3, step_time=0.5,
                            tokens_per_s=4096.0, peak_memory_mb=0.0))
    writer.validation(len(losses), 2.5, 1024)
    writer.close()


def test_plot_draws_png_and_svg_with_one_point_per_step(tmp_path, capsys):
    _metrics_run(tmp_path, [5.0, 4.0, 3.5, 3.2], restart_at=2)
    assert main(["plot", str(tmp_path)]) == 0
    assert "(4 steps, 1 validations)" in capsys.readouterr().out
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "curves.svg").read_text()
    assert "<svg" in svg and "validation loss" in svg


def test_plot_of_a_directory_without_metrics_is_an_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err


def _hf_llama(path: Path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()


def test_generate_from_a_hf_directory_is_transformers_greedy_decoding(tmp_path, capsys):
    hf = _hf_llama(tmp_path / "hf")
    prompt = "The cat"
    assert main(["generate", str(tmp_path / "hf"), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    ids = torch.tensor([list(prompt.encode())])
    want = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
    assert text == bytes(i for i in want).decode("utf-8", errors="replace")


def test_generate_top_p_is_seeded_and_bad_options_are_refused(tmp_path, capsys):
    _hf_llama(tmp_path / "hf")
    argv = ["generate", str(tmp_path / "hf"), "--prompt", "a", "--max-new-tokens", "4",
            "--top-p", "0.9", "--seed", "3"]
    assert main(argv) == 0 and main(argv) == 0
    out = capsys.readouterr().out  # the same text twice (sampled bytes may hold newlines)
    half = len(out) // 2
    assert out[:half] == out[half:] and out.startswith("a")
    assert main(argv[:6] + ["--top-p", "1.5"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "a"]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_generate_from_a_run_directory_reads_its_newest_checkpoint(tmp_path, capsys):
    from dataclasses import replace

    from plait.ir.cluster import local_cpu
    from plait.ir.dsl import load_job
    from plait.ir.plan import Layout
    from plait.lowering.build import build_model
    from plait.runtime import checkpoint
    from plait.runtime import mesh as mesh_mod
    from plait.runtime.generate import sample
    from plait.runtime.launch import Checkpointing, hand_plan, run_options, write_run_dir
    from plait.runtime.train import Trainer

    job = load_job(str(ROOT / "specs" / "jobs" / "tiny-local.plait"))
    job = replace(job, cluster=local_cpu(1), global_batch=2, seq_len=16)
    plan = hand_plan(job, Layout())
    mesh_mod.init_distributed("gloo", 60, f"file://{tmp_path}/rdzv", 0, 1)
    try:
        trainer = Trainer(job, plan, mesh_mod.build_mesh(plan.layout, 60))
        trainer.fit(2)
        checkpoint.save(trainer, tmp_path / "ckpt", 2, 2)
        trained = build_model(job.model)
        trained.load_state_dict({k: v.detach() for k, v in trainer.program.local_parameters().items()},
                                strict=False)
    finally:
        mesh_mod.destroy()
    write_run_dir(job, plan, tmp_path / "run",
                  **run_options(job, ckpt=Checkpointing(save=str(tmp_path / "ckpt"))))
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
    want = sample(trained.eval(), list(b"Hi"), 5)
    assert capsys.readouterr().out.rstrip("\n") == bytes(want).decode("utf-8", errors="replace")
    assert json.loads((tmp_path / "run" / "options.json").read_text())["save"]
