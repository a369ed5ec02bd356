"""docs/reference.md: its key tables are generated from the comments on the config fields (pipeline/keys.py)
and match the code; its links resolve; the README names every recipe."""
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline import keys
from pipeline.quant_backends import Candidate
from pipeline.recipe import Recipe
from pipeline.stages import finetune
from pipeline.training import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def test_the_key_tables_are_what_the_code_generates():
    stale = keys.stale(DOC.read_text())
    assert not stale, (f"{DOC.name}: the key tables of {', '.join(stale)} differ from the code's field comments and "
                       f"defaults; run `{keys.WRITE}` (and commit the result)")


def recipe_keys(cls, prefix="") -> set[str]:
    """Every dotted key a recipe can set below `cls` (settings groups key by key; list items are not keys)."""
    out = set()
    for f in dataclasses.fields(cls):
        value = keys.default_of(f)
        if dataclasses.is_dataclass(value):
            out |= recipe_keys(type(value), f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def documented_keys() -> set[str]:
    """The dotted keys the generated tables in the docs list, read from the docs themselves."""
    out = set()
    for name, body in keys.blocks(DOC.read_text()).items():
        prefix = "" if name == keys.TOP else name + "."
        for line in body.splitlines()[2:]:
            out |= {prefix + k for k in re.findall(r"`([^`]+)`", line.split(" | ")[0])}
    return out


def test_every_key_of_every_section_is_in_a_table():
    shared = {"distill." + f.name for f in dataclasses.fields(TrainConfig)}  # the finetune table lists them once
    candidates = recipe_keys(Candidate, "quantize.candidates.")  # the keys of each item of the list
    missing = sorted((recipe_keys(Recipe) | candidates) - documented_keys() - shared)
    assert not missing, f"keys missing from the tables in {DOC.name}: {missing}; run `{keys.WRITE}`"


def test_an_edited_default_makes_the_check_fail(monkeypatch):
    monkeypatch.setattr(finetune.FinetuneConfig.__dataclass_fields__["save_steps"], "default", 100)
    assert "| `save_steps` | 100 (distill: 200) |" in keys.table("finetune")  # distill kept its own
    assert keys.stale(DOC.read_text()) == ["finetune"]
    assert keys.rewrite(DOC.read_text()) != DOC.read_text()


def test_an_edited_comment_makes_the_check_fail(monkeypatch):
    real = keys._declared
    edited = dict(real(TrainConfig), max_steps="optimizer steps")
    monkeypatch.setattr(keys, "_declared", lambda cls: edited if cls is TrainConfig else real(cls))
    assert "| `max_steps` | -1 | optimizer steps |" in keys.table("finetune")
    assert "finetune" in keys.stale(DOC.read_text())


@dataclass
class Described:
    """Keys for the tests below."""

    plain: int = 1  # a trailing comment
    # a comment above,
    above: str = "x"  # continued at the end
    # what it is
    # why: a note for developers, not for the docs
    noted: float = 5e-5  # why: neither is this
    ditto: int | None = None  # ditto
    later: list[str] = field(default_factory=lambda: ["a"], metadata={"doc_default": "the first letter"})  # words


@dataclass
class Undescribed:
    described: int = 1  # it has one
    silent: int = 2


def test_descriptions_come_from_the_comments():
    assert keys._declared(Described) == {"plain": "a trailing comment", "noted": "what it is", "ditto": "ditto",
                                         "above": "a comment above, continued at the end", "later": "words"}
    assert keys.describe(finetune.FinetuneConfig, "save_steps") == keys.describe(TrainConfig, "save_steps")  # inherited


def test_a_table_merges_ditto_rows_and_shows_the_doc_default():
    assert keys.table(Described).splitlines()[2:] == [
        "| `plain` | 1 | a trailing comment |",
        "| `above` | `x` | a comment above, continued at the end |",
        "| `noted` / `ditto` | 5e-5 / null | what it is |",
        "| `later` | the first letter | words |"]


def test_a_key_without_a_description_fails():
    with pytest.raises(ValueError, match="Undescribed.silent has no description"):
        keys.table(Undescribed)


def test_the_cli_prints_a_section(capsys):
    from pipeline.cli import main

    assert main(["keys", "quantize"]) == 0
    out = capsys.readouterr().out
    assert "| `max_ppl_increase` | 3.0 |" in out and "| `context` / `stride` / `max_tokens` | 256 / 128 / 8192 |" in out
    assert main(["keys", "finetun"]) == 2


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_docs_resolve():
    root = DOC.parents[1]
    broken = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|/", target):
                continue  # the web, and Hub paths inside model-card snippets
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                heads = {slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)}
                if anchor not in heads:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_names_every_shipped_recipe():
    root = DOC.parents[1]
    readme = (root / "README.md").read_text()
    assert [p.name for p in (root / "recipes").glob("*.yaml") if f"recipes/{p.name}" not in readme] == []
