"""Typed dataclass parsing for recipes: every problem is collected, then reported at once."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class RecipeError(Exception):
    """A recipe (or override) is invalid; `problems` lists every issue found."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " or null"
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check `value` against type `tp`; return the (possibly converted) value or record an error."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping of settings, got {value!r}")
            return tp()
        return parse(tp, value, key, errors)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        trials: list[list[str]] = []
        for arg in options:
            trials.append([])
            out = _coerce(value, arg, key, trials[-1])
            if not trials[-1]:
                return out
        # A mapping meant for the one section type among the options: its own problems say more than the union
        sections = [t for a, t in zip(options, trials) if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:
            errors.extend(sections[0])
        else:
            errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            errors.append(f"{key}: {value!r} is not allowed; use one of: {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            hint = f"; write a list, e.g. [{value}]" if isinstance(value, (str, int, float)) else ""
            errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}{hint}")
            return []
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return {}
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        errors.append(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    if not isinstance(value, tp):
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def parse(cls: type, data: dict, prefix: str, errors: list[str]):
    """Build dataclass `cls` from `data`, appending a message per problem to `errors`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append(f"{where}: unknown key{hint}; allowed keys: {', '.join(fields)}")
            continue
        before = len(errors)
        kwargs[key] = _coerce(value, hints[key], where, errors)
        if len(errors) > before and not dataclasses.is_dataclass(hints[key]):
            # reported; the checks below see the default, not a null or a string where a path or number goes
            field = fields[key]
            if field.default is not dataclasses.MISSING:
                kwargs[key] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                kwargs[key] = field.default_factory()
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix + '.' if prefix else ''}{name}: required key is missing")
            kwargs[name] = None
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None and not any(e.startswith(prefix) for e in errors if prefix):
        for problem in check():
            errors.append(f"{prefix}.{problem}" if prefix else problem)
    return obj


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Apply a `section.key=value` override onto the raw recipe mapping."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
