"""docs/reference.md documents every recipe key of every section, with the default the code has."""
import dataclasses
import re
from pathlib import Path

import pytest

from pipeline import data, push
from pipeline.recipe import Recipe
from pipeline.stages import distill, evaluate, finetune, prune, quantize

DOC = Path(__file__).resolve().parents[1] / "docs" / "reference.md"
# recipe section -> (config class, the doc sections whose tables document it)
SECTIONS = {
    "(top level)": (Recipe, ["Recipe format"]),
    "data": (data.DataConfig, ["Recipe format"]),
    "finetune": (finetune.FinetuneConfig, ["Stage: finetune"]),
    "prune": (prune.PruneConfig, ["Stage: prune"]),
    "distill": (distill.DistillConfig, ["Stage: distill", "Stage: finetune"]),  # + the shared training keys
    "quantize": (quantize.QuantizeConfig, ["Stage: quantize"]),
    "evaluate": (evaluate.EvaluateConfig, ["Stage: evaluate"]),
    "push": (Recipe.__dataclass_fields__["push"].type, ["Stage: push"]),
}
IN_WORDS = {("(top level)", "name")}  # defaults the docs describe rather than state (the recipe's file name)
SECTION_KEYS = {"data", "finetune", "prune", "distill", "quantize", "evaluate", "push"}


def table_rows(sections: list[str]) -> dict[str, list[str]]:
    """{key: [default cell, ...]} from the key tables under the given `## ` headings; a nested key is
    `lora.r`, written so in a row or as a table of its own headed "finetune.qat key" (any section)."""
    rows: dict[str, list[str]] = {}
    current, prefix = None, ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
        head = re.match(r"\| `[a-z_]+\.([a-z_]+)` key \|", line)
        if head:
            prefix = head.group(1) + "."
        elif not line.startswith("|"):
            prefix = ""
        elif line.startswith("| `") and (prefix or current in sections):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for key in re.findall(r"`([^`]+)`", cells[0]):
                rows.setdefault(prefix + key, []).append(cells[1])
    return rows


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def shown(value, cell: str) -> bool:
    """Whether a default cell states `value` (scalars only; lists and sections are described in words)."""
    if value is None:
        return "null" in cell
    if isinstance(value, bool):
        return str(value).lower() in cell
    if isinstance(value, (int, float)):
        return any(float(n) == value for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", cell))
    if isinstance(value, str):
        return value in cell
    return True


@pytest.mark.parametrize("section", SECTIONS)
def test_every_recipe_key_is_documented_with_its_default(section):
    cls, doc_sections = SECTIONS[section]
    rows = table_rows(doc_sections)
    missing, wrong = [], []
    for f in dataclasses.fields(cls):
        if not f.init or (section == "(top level)" and f.name in SECTION_KEYS):
            continue
        grouped = any(k.startswith(f.name + ".") for k in rows)
        if f.name not in rows and not grouped:
            missing.append(f.name)
            continue
        value = default_of(f)
        if (section, f.name) in IN_WORDS:
            continue
        if f.name in rows and value is not dataclasses.MISSING and not any(shown(value, c) for c in rows[f.name]):
            wrong.append(f"{f.name}: code {value!r}, docs {rows[f.name]}")
        if dataclasses.is_dataclass(value) and grouped:
            for sub in dataclasses.fields(value):  # a settings group documented key by key (lora.r, qat.bits)
                key = f"{f.name}.{sub.name}"
                if key not in rows:
                    missing.append(key)
                elif not any(shown(getattr(value, sub.name), cell) for cell in rows[key]):
                    wrong.append(f"{key}: code {getattr(value, sub.name)!r}, docs {rows[key]}")
    assert not missing, f"{section}: keys missing from {DOC.name}: {missing}"
    assert not wrong, f"{section}: defaults differ: {wrong}"


def test_the_check_sees_a_wrong_default():
    field = next(f for f in dataclasses.fields(finetune.FinetuneConfig) if f.name == "save_steps")
    assert shown(default_of(field), "200") and not shown(default_of(field), "100 (or null)")


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
