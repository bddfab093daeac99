"""`plait export hf CKPT -o DIR`: a training checkpoint of any layout (or a `plait prune` run's
student) as a Hugging Face model."""
from __future__ import annotations

import argparse

from plait.cli import console
from plait.ir.errors import PlaitError
from plait.ir.outputs import check_output_dir, claim_output_dir

from . import inputs

EXPORT_KIND = "Hugging Face export"


def hf_args(p: argparse.ArgumentParser) -> None:
    """The options only `export hf` reads (JOB is then the checkpoint directory)."""
    p.add_argument("-o", "--output", help="hf: the model directory to write")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="hf: weight dtype (default bf16)")
    p.add_argument("--family", help="hf: the model_type to write (default: inferred from the model, "
                                    "e.g. llama; deepseek_v3 for latent attention, nemotron_h for hybrids)")
    p.add_argument("--max-shard-mb", type=int, default=5 * 1024,
                   help="hf: largest safetensors shard in MiB (default 5120)")


def export_hf_command(args: argparse.Namespace) -> int:
    from plait.runtime.ckpt_export import export_hf

    if not args.output:
        raise PlaitError("export hf needs -o DIR", hint="plait export hf CKPT -o DIR")
    if args.plan or args.layout:
        raise PlaitError("--plan / --layout have no effect on export hf: a checkpoint loads "
                         "whatever its layout")
    inputs.at_least(args.max_shard_mb, 1, "--max-shard-mb")
    inputs.existing_dir(args.job, "CKPT")
    check_output_dir(args.output, EXPORT_KIND)
    claim_output_dir(args.output, EXPORT_KIND)
    done = export_hf(args.job, args.output, args.dtype, args.family, args.max_shard_mb << 20)
    source = f"after step {done['step']}" if done["step"] is not None else "(pruned student)"
    console.print(f"{args.output}: {done['family']} model {source}, "
                  f"{done['tensors']} tensors in {len(done['files'])} shard(s) ({args.dtype})"
                  + (f", tokenizer {done['tokenizer']}" if done["tokenizer"] else ""))
    return 0
