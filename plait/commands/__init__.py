"""Subcommands of the `plait` CLI, one module per family; importing registers them."""
from . import spec  # noqa: F401
from . import hf  # noqa: F401
from . import run  # noqa: F401
from . import plan  # noqa: F401
from . import prune  # noqa: F401
from . import doctor  # noqa: F401
from . import operate  # noqa: F401
from . import calibrate  # noqa: F401
