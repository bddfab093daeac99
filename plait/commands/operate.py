"""Looking at a run: `plait plot RUN_DIR` (loss and throughput curves from metrics.jsonl) and
`plait generate SOURCE --prompt TEXT` (text from a trained model, as a sanity check)."""
from __future__ import annotations

import argparse
from pathlib import Path

from plait.cli import arguments, command, console
from plait.ir.errors import PlaitError

from . import inputs


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by `plait run`")
    p.add_argument("-o", "--output", help="file name without extension (default: RUN_DIR/curves); "
                   ".png and .svg are written")


@command("plot", help="draw a run's loss and throughput curves (PNG and SVG)")
@arguments(_plot_args)
def plot(args: argparse.Namespace) -> int:
    from plait.runtime.metrics import METRICS, read

    run_dir = Path(args.run_dir)
    if not (run_dir / METRICS).is_file():
        raise PlaitError(f"{run_dir} holds no {METRICS}", hint="pass a run directory of `plait run`")
    train, val = _latest(read(run_dir, "train")), _latest(read(run_dir, "validation"))
    if not train:
        raise PlaitError(f"{run_dir / METRICS} holds no training steps yet")
    out = Path(args.output) if args.output else run_dir / "curves"
    files = draw(train, val, out, title=run_dir.name)
    console.print(f"wrote {', '.join(map(str, files))} ({len(train)} steps, "
                  f"{len(val)} validations)")
    return 0


def _latest(records: list[dict]) -> list[dict]:
    """One record per step, the last one (a restarted run repeats the steps after its checkpoint)."""
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def draw(train: list[dict], val: list[dict], out: Path, title: str) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001 - missing or broken matplotlib
        raise PlaitError(f"plot needs matplotlib ({e})", hint="pip install 'plait[report]'") from None
    steps = [r["step"] for r in train]
    fig, (loss_ax, speed_ax) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    loss_ax.plot(steps, [r["loss"] for r in train], label="train loss", lw=1.2)
    if val:
        loss_ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.set_title(title)
    speed_ax.plot(steps, [r["tokens_per_s"] for r in train], color="tab:green", lw=1.2)
    speed_ax.set_ylabel("tokens / s")
    speed_ax.set_xlabel("step")
    mfu_ax = speed_ax.twinx()
    mfu_ax.plot(steps, [100 * r["mfu"] for r in train], color="tab:red", lw=0.8, alpha=0.6)
    mfu_ax.set_ylabel("MFU (% of bf16 peak)", color="tab:red")
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    files = [out.with_suffix(".png"), out.with_suffix(".svg")]
    for f in files:
        fig.savefig(f, dpi=120)
    plt.close(fig)
    return files


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a Hugging Face model directory, or a run directory of "
                   "`plait run --save` (its newest checkpoint)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--checkpoint", help="with a run directory: this checkpoint instead")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate (default 64)")
    p.add_argument("--top-p", type=float, help="sample from the top-p nucleus (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divide the logits by this before top-p sampling (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --top-p)")


@command("generate", help="continue a prompt with a trained model (greedy or top-p)")
@arguments(_generate_args)
def generate(args: argparse.Namespace) -> int:
    from plait.runtime.generate import from_hf_dir, from_run_dir, sample

    inputs.at_least(args.max_new_tokens, 1, "--max-new-tokens")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise PlaitError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature <= 0:
        raise PlaitError(f"--temperature must be > 0, got {args.temperature}")
    source = Path(args.source)
    if (source / "job.json").is_file():
        model, tokenizer = from_run_dir(source, args.checkpoint)
    elif (source / "config.json").is_file():
        model, tokenizer = from_hf_dir(source)
    else:
        raise PlaitError(f"{source} is neither a run directory (job.json) nor a Hugging Face model "
                         "directory (config.json)")
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise PlaitError("--prompt is empty after tokenization")
    ids = sample(model, prompt, args.max_new_tokens, args.top_p, args.temperature, args.seed,
                 window=model.spec.max_seq)
    print(tokenizer.decode(ids))
    return 0
