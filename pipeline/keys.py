"""Recipe keys, described once: the comment on a config field is the key's documentation.

`python -m pipeline keys [SECTION]` prints the keys with their defaults and meanings, and the key tables in
docs/reference.md are generated from the same rows (`python -m pipeline keys --write`; tests/test_docs.py fails
when they differ). The convention, for every config dataclass a recipe is parsed into:

- a field's description is its trailing comment, or the `#` lines directly above it, or both (above first);
  it is written for users and may use Markdown (`code`, links);
- `# why: ...` is a note for developers (why a default is what it is) and stays out of the docs: a trailing
  `# why:` comment, or a `# why:` line above the field together with the lines after it up to the field;
- `# ditto` (the whole comment) puts a field in the row of the field above it (`context` / `stride` / ...);
- a field a subclass declares again without a description keeps its base class's (`save_steps`);
- every key is described: a field without a description is an error, not an empty cell;
- the default shown is the field's default, written as in YAML; `metadata={"doc_default": ...}` replaces it where
  words say more (`name`: the file name), and a settings group with an `enabled` key shows as on / off.

This module reads the config modules' source; none of them imports it.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml
from transformers import AutoConfig

from pipeline import families, formats
from pipeline.recipe import Recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "reference.md"
WRITE = "python -m pipeline keys --write"
DITTO = "ditto"
# Settings groups, and lists of them, with a table of their own (where the docs explain them); the section's table
# gives them one row. Every other group is listed key by key in its section's table (lora.r, lora.alpha, ...).
OWN_TABLES = ("finetune.qat", "quantize.candidates")
TOP = "top"  # the recipe's top-level keys


@dataclass
class Row:
    keys: list[str]  # one key, or several that share the row (`# ditto`)
    defaults: list[str]  # as the docs show them
    meaning: str

    @property
    def default(self) -> str:
        return self.defaults[0] if len(set(self.defaults)) == 1 else " / ".join(self.defaults)


@cache
def _declared(cls: type) -> dict[str, str]:
    """{field: description} for the fields `cls` declares in its own body ('' where there is none); {} when its
    source cannot be read (a class made by make_dataclass)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text after '#', whether the comment fills the line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string[1:].strip(), not tok.line[:tok.start[1]].strip())
    described = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while comments.get(n, ("", False))[1]:
            above.insert(0, comments[n][0])
            n -= 1
        notes = [i for i, text in enumerate(above) if text.startswith("why:")]
        above = above[:notes[0]] if notes else above
        trailing = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1)
                    if n in comments and not comments[n][1] and not comments[n][0].startswith("why:")]
        described[node.target.id] = " ".join(above + trailing).strip()
    return described


def describe(cls: type, name: str) -> str:
    """The description of field `name` of dataclass `cls`: its own comment, else the nearest base class's."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and _declared(klass).get(name):
            return _declared(klass)[name]
    raise ValueError(f"{cls.__name__}.{name} has no description: describe the key in a comment on the field "
                     f"(see pipeline/keys.py), then run {WRITE}")


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _plain(value):
    """`value` as YAML would hold it; a dataclass as the keys it sets beyond its defaults."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if default_of(f) is dataclasses.MISSING or getattr(value, f.name) != default_of(f)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def shown(value) -> str:
    """A default as the docs show it: YAML (`null`, `true`, 5e-5, `auto`, `[mlp]`), or required / on / off."""
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value and abs(value) < 0.01:  # 5e-5, not 5e-05 or 0.00005
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return f"`{value}`"
    if dataclasses.is_dataclass(value) and hasattr(value, "enabled"):
        return "on" if value.enabled else "off"
    return f"`{yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6).strip()}`"


def _field(cls: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


def _group_class(cls: type, name: str) -> type:
    """The settings class of field `name` of `cls`: its default's class, or the item class of a list of them."""
    value = default_of(_field(cls, name))
    if dataclasses.is_dataclass(value):
        return type(value)
    (item,) = typing.get_args(typing.get_type_hints(cls)[name])  # list[Candidate]
    return item


def sections() -> dict[str, type]:
    """{table name: config class}: the top level, each recipe section in recipe order (data, finetune, ...,
    push), each followed by its settings groups that have a table of their own (finetune.qat)."""
    out = {TOP: Recipe}
    for f in dataclasses.fields(Recipe):
        value = default_of(f)
        if dataclasses.is_dataclass(value):
            out[f.name] = type(value)
            for name in OWN_TABLES:
                section, _, group = name.partition(".")
                if section == f.name:
                    out[name] = _group_class(type(value), group)
    return out


def title(name: str) -> str:
    """How a recipe names the keys of table `name`: `finetune.qat`, `quantize.candidates[]` (each item's keys)."""
    section, _, group = name.partition(".")
    if name == TOP or not group:
        return name
    return name + ("[]" if isinstance(default_of(_field(sections()[section], group)), list) else "")


def _shared() -> dict[str, tuple[type, str]]:
    """{section: (base config class, the earlier section that documents the base's keys)}: distill takes the
    training keys of TrainConfig, which the finetune table lists."""
    first: dict[type, str] = {}
    shared = {}
    for name, cls in sections().items():
        for base in cls.__mro__[1:]:
            if dataclasses.is_dataclass(base):
                if base in first:
                    shared[name] = (base, first[base])
                else:
                    first[base] = name
    return shared


def rows(name: str | type) -> list[Row]:
    """The key table of section `name` (see `sections`), or of any config dataclass: a settings group key by key
    (lora.r), `# ditto` fields in the row above; a section that shares a base's keys with an earlier one lists
    its own keys only, and the earlier one lists those first, then the shared keys, each with the later sections'
    defaults where they differ: `5e-5 (distill: 1e-3)`."""
    if isinstance(name, type):
        cls, name, shared = name, name.__name__, {}
    else:
        cls, shared = sections()[name], _shared()
    skip = set(shared[name][0].__dataclass_fields__) if name in shared else set()
    if name == TOP:
        skip |= {f.name for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(default_of(f))}
    later = [(other, sections()[other], base) for other, (base, owner) in shared.items() if owner == name]
    fields = dataclasses.fields(cls)
    if later:
        fields = sorted(fields, key=lambda f: f.name in later[0][2].__dataclass_fields__)  # stable: own keys first
    out: list[Row] = []
    for f in fields:
        if not f.init or f.name in skip:
            continue
        default = f.metadata.get("doc_default") or shown(default_of(f))
        for other, other_cls, base in later:
            theirs = default_of(_field(other_cls, f.name)) if f.name in base.__dataclass_fields__ else default_of(f)
            if theirs != default_of(f):
                default += f" ({other}: {shown(theirs)})"
        _extend(out, _rows(cls, f, "", default, name), name)
    return out


def _rows(cls: type, f: dataclasses.Field, prefix: str, default: str, section: str) -> list[Row]:
    meaning = describe(cls, f.name)
    value = default_of(f)
    if dataclasses.is_dataclass(value) and f"{section}.{prefix}{f.name}" not in OWN_TABLES:  # lora.r, lora.alpha
        group: list[Row] = []
        for sub in dataclasses.fields(value):
            sub_default = sub.metadata.get("doc_default") or shown(default_of(sub))
            _extend(group, _rows(type(value), sub, f"{prefix}{f.name}.", sub_default, section), section)
        return group
    return [Row([prefix + f.name], [default], meaning)]


def _extend(out: list[Row], new: list[Row], section: str) -> None:
    for row in new:
        if row.meaning != DITTO:
            out.append(row)
        elif out:
            out[-1].keys += row.keys
            out[-1].defaults += row.defaults
        else:
            raise ValueError(f"{section}.{row.keys[0]}: `# ditto` needs a described key above it")


def table(name: str | type) -> str:
    """The keys of section `name` (or of a config dataclass) as a Markdown table: key, default, meaning; or
    one of the other generated tables (EXTRA)."""
    if isinstance(name, str) and name in EXTRA:
        return EXTRA[name]()
    head = "key" if isinstance(name, type) or name == TOP or "." not in name else f"`{title(name)}` key"
    lines = [f"| {head} | default | meaning |", "| --- | --- | --- |"]
    for row in rows(name):
        keys = " / ".join(f"`{k}`" for k in row.keys)
        lines.append(f"| {keys} | {_cell(row.default)} | {_cell(row.meaning)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return re.sub(r"(?<!\\)\|", r"\\|", text)


def select(section: str | None = None) -> list[str]:
    """The tables of `section`, its own-table groups included (finetune: finetune, finetune.qat), or all."""
    return [n for n in sections() if section is None or n == section or n.startswith(section + ".")]


def markdown(section: str | None = None) -> str:
    """What `python -m pipeline keys [SECTION]` prints: the tables of `select(section)`, each under its name."""
    parts = []
    for name in select(section):
        part = f"## {'top-level keys' if name == TOP else f'`{title(name)}` keys'}\n\n{table(name)}"
        if name in _shared():
            base, owner = _shared()[name]
            keys = [f.name for f in dataclasses.fields(base)]
            part += (f"\n\nplus the training keys it shares with `{owner}` (`{keys[0]}` ... `{keys[-1]}`): "
                     f"python -m pipeline keys {owner}")
        parts.append(part)
    return "\n\n".join(parts)


def family_table() -> str:
    """docs/reference.md's family x stage table, from pipeline/families.py and the formats' own checks (so the OpenVINO
    column is what the installed optimum-intel and transformers allow)."""
    lines = ["| family | `model_type` | width prune (mlp, heads, hidden) | depth prune | LoRA default targets | "
             "GGUF export | OpenVINO export | quirks the stages handle |", "|---|---|---|---|---|---|---|---|"]
    reasons: dict[str, int] = {}
    for f in families.FAMILIES:
        config = AutoConfig.for_model(f.model_types[0])
        cells = [f.name, ", ".join(f"`{t}`" for t in f.model_types),
                 f"yes ({f.layout} layout)" if f.layout else f"no: {f.no_width}", "yes",
                 ", ".join(f.lora_targets)]
        for fmt in (formats.gguf, formats.openvino):
            below = formats.openvino.lifted_below(config) if fmt is formats.openvino else None
            if below is not None:  # the same cell whichever release is installed
                note = (f"optimum-intel caps this export at transformers 5.0; measured to export correctly below "
                        f"{below}, where pipeline/compat.py lifts the cap (above it, validate refuses)")
                cells.append(f"yes, transformers < {below} [{reasons.setdefault(note, len(reasons) + 1)}]")
                continue
            problem = fmt.unsupported(config)
            if problem is not None:  # one note per distinct reason, below the table
                # the notes name no installed version, so one table holds for every version the pins allow
                problem = problem.split("; this model is")[0].split("; this is ")[0]
                reasons.setdefault(problem, len(reasons) + 1)
            cells.append("yes" if problem is None else f"no [{reasons[problem]}]")
        cells.append("; ".join(f.quirks))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines + [""] + [f"[{n}] {reason}." for reason, n in reasons.items()])


# Generated tables that are not key tables: the model-family support table (pipeline/families.py)
EXTRA = {"families": family_table}


def _marker(name: str, end: bool = False) -> str:
    return f"<!-- keys:{name}:end -->" if end else f"<!-- keys:{name}:start (generated by {WRITE}) -->"


BLOCK = re.compile(r"<!-- keys:(?P<name>[\w.]+):start \(generated by [^)]*\) -->\n(?P<body>.*?)"
                   r"<!-- keys:(?P=name):end -->", re.DOTALL)


def blocks(text: str) -> dict[str, str]:
    """{name: table} of the generated blocks in a Markdown text."""
    return {m["name"]: m["body"].strip() for m in BLOCK.finditer(text)}


def rewrite(text: str, names: list[str] | None = None) -> str:
    """`text` with the generated blocks (those named, or all) replaced by the tables the code gives now; a
    ValueError if a block is missing (its markers say where the table goes)."""
    wanted = names or [*select(), *EXTRA]
    missing = [n for n in wanted if n not in blocks(text)]
    if missing:
        raise ValueError(f"no generated block for {', '.join(missing)}: put the markers\n{_marker(missing[0])}\n"
                         f"{_marker(missing[0], end=True)}\nwhere the table goes")
    return BLOCK.sub(lambda m: f"{_marker(m['name'])}\n\n{table(m['name'])}\n\n{_marker(m['name'], end=True)}"
                     if m["name"] in wanted else m[0], text)


def stale(text: str) -> list[str]:
    """Sections whose generated block in `text` is missing, out of date or not a section."""
    found = blocks(text)
    return ([n for n in [*sections(), *EXTRA] if found.get(n) != table(n)]
            + [n for n in found if n not in sections() and n not in EXTRA])


def write(path: Path = DOC, names: list[str] | None = None) -> list[str]:
    """Rewrite the generated blocks of `path`; return the names of those that changed."""
    before = path.read_text()
    after = rewrite(before, names)
    if after != before:
        path.write_text(after)
    return [n for n in (names or [*select(), *EXTRA]) if blocks(before).get(n) != blocks(after).get(n)]
