"""JSON round trip for the frozen IR dataclasses, driven by their type hints.

`to_dict(x)` gives plain JSON data; `from_dict(Cls, data)` rebuilds an equal object. Tuples stay
tuples, nested dataclasses and Optional/Union fields are rebuilt from the hints.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from functools import lru_cache
from typing import Any, Literal, Union


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def to_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(to_dict(obj), indent=indent)


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: Any, data: Any) -> Any:
    """Rebuild a value of type ``cls`` (a dataclass or a typing hint) from JSON data."""
    if data is None:
        return None
    origin = typing.get_origin(cls)
    args = typing.get_args(cls)
    if origin in (Union, types.UnionType):
        return _from_union(args, data)
    if origin is Literal or cls is Any:
        return data
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_dict(args[0], v) for v in data)
        return tuple(from_dict(a, v) for a, v in zip(args, data))
    if origin is dict:
        return {k: from_dict(args[1], v) for k, v in data.items()}
    if dataclasses.is_dataclass(cls):
        hints = _hints(cls)
        kwargs = {f.name: from_dict(hints[f.name], data[f.name])
                  for f in dataclasses.fields(cls) if f.name in data}
        return cls(**kwargs)
    if cls is float and isinstance(data, int):
        return float(data)
    return data


def _from_union(args: tuple, data: Any) -> Any:
    non_none = [a for a in args if a is not type(None)]
    if len(non_none) == 1:
        return from_dict(non_none[0], data)
    for a in non_none:  # scalar unions such as Union[int, bool, str]: keep JSON's own type
        if isinstance(a, type) and not dataclasses.is_dataclass(a) and isinstance(data, a):
            return data
    for a in non_none:
        if dataclasses.is_dataclass(a) and isinstance(data, dict) and set(data) <= {
                f.name for f in dataclasses.fields(a)}:
            return from_dict(a, data)
    return data


def from_json(cls: Any, text: str) -> Any:
    return from_dict(cls, json.loads(text))
