"""The plait spec language: parse (text -> AST), resolve (AST -> IR), fmt (IR -> canonical text)."""
from .resolve import Library, load_file, load_job, load_model, load_prune_job, parse_text

__all__ = ["Library", "load_file", "load_job", "load_model", "load_prune_job", "parse_text"]
