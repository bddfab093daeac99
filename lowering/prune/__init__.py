"""Pruning on real weights: importance estimation with forward hooks, weight slicing by a PrunePlan,
and checked loading / saving of safetensors checkpoints."""
