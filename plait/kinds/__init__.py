"""Block kinds as plug-ins: one package per kind, one module per facet (see plait/ir/kinds.py for
the registry and the list of facets). The core reaches these only through ``ir.kinds.facet``."""
