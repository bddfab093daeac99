"""Regenerate corpus.txt, the bundled training text: the docstrings of a fixed list of Python
standard-library modules (public-domain-style English prose about programming, ~270 KB).

    python plait/data/make_corpus.py   # deterministic for a given Python version
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

MODULES = (
    "abc argparse array base64 bisect calendar collections contextlib copy csv dataclasses datetime "
    "decimal difflib email enum fractions functools glob gzip hashlib heapq hmac html http inspect "
    "io ipaddress itertools json logging math mimetypes numbers operator os pathlib pickle pprint "
    "queue random re sched secrets shelve shlex shutil socket sqlite3 statistics string struct "
    "subprocess tarfile tempfile textwrap threading time timeit tokenize trace traceback types "
    "typing unittest urllib uuid warnings weakref zipfile zlib").split()


def module_text(name: str) -> str:
    module = importlib.import_module(name)
    parts = [f"The {name} module\n\n{inspect.getdoc(module) or ''}"]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{name}.{attr}\n\n{doc}")
    return "\n\n".join(parts)


def main() -> None:
    text = "\n\n\n".join(module_text(m) for m in MODULES) + "\n"
    out = Path(__file__).with_name("corpus.txt")
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(text.encode()):,} bytes)")


if __name__ == "__main__":
    main()
