"""plait: a declarative graph compiler and planner for large Transformer, MoE and hybrid models."""
__version__ = "0.1.0"
