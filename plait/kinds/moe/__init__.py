"""The moe block kind: every facet of it (plait/ir/kinds.py lists them)."""
