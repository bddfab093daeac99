"""`plait import hf CONFIG [-o model.plait] [--name NAME]`: a transformers config.json (or a model
directory holding one) as a plait model spec."""
from __future__ import annotations

import argparse
import sys

from plait.cli import arguments, command, err_console
from plait.ir import counts
from plait.ir.dsl import parse_text
from plait.ir.dsl.fmt import format_model
from plait.ir.errors import PlaitError
from plait.ir.hf import import_notes, load_hf_config, model_from_hf_config

from . import inputs


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", choices=["hf"], help="hf: a Hugging Face transformers config.json")
    p.add_argument("config", help="a config.json, or a model directory that holds one")
    p.add_argument("-o", "--output", help="write the spec here instead of to stdout (a new file, or one "
                   "plait imported before)")
    p.add_argument("--name", help="model name (default: from _name_or_path, else model_type)")


IMPORT_HEADER = "# imported from "  # the first line of every spec `plait import` writes


def spec_text(config_path: str, name: str | None = None) -> str:
    """The canonical spec text of an HF config, checked to parse back to the same model."""
    cfg = load_hf_config(config_path)
    spec = model_from_hf_config(cfg, name)
    text = format_model(spec)
    back = parse_text(text, file="<import>").models.get(spec.name)
    if back != spec:  # the formatter lost something: refuse rather than write a different model
        raise PlaitError(f"internal: the spec written for {spec.name!r} does not read back equal",
                         hint="please report this with the config.json")
    header = (f"{IMPORT_HEADER}{config_path}\n"
              f"# {counts.params(spec).total:,} parameters\n"
              + "".join(f"# note: {note}\n" for note in import_notes(cfg)))
    return header + text.rstrip("\n") + "\n"


@command("import", help="import a model spec from another format (hf: transformers config.json)")
@arguments(_setup)
def import_model(args: argparse.Namespace) -> int:
    if args.output:  # checked before reading: never replace a file plait did not write
        inputs.replaceable_file(args.output, "-o", lambda old: old.startswith(IMPORT_HEADER))
    text = spec_text(args.config, args.name)
    if not args.output:
        sys.stdout.write(text)
        return 0
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    err_console.print(f"wrote {args.output}", markup=False, highlight=False)
    return 0
