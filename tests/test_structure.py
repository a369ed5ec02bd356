"""The layout holds: no import circles inside pipeline/ (function-level and type-checking imports count), and
the stage and format tables are the one place the stages and output formats are listed."""
import ast
import dataclasses
from pathlib import Path

from pipeline import formats, quant_backends, runner
from pipeline.recipe import Recipe
from pipeline.stages import CHAINED, MODEL_FOLDERS, ORDER, SECTIONS, STAGES

ROOT = Path(__file__).resolve().parents[1] / "pipeline"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: project modules it imports}, read with ast from every .py file under `root` (a package):
    imports anywhere in a file count, inside functions and `if TYPE_CHECKING:` blocks too."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one, else a name of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_in_the_pipeline():
    graph = import_graph(ROOT)
    assert "pipeline.stages.quantize" in graph["pipeline.stages"]  # the graph sees the table's imports
    assert circles(graph) == []


def test_the_circle_check_sees_function_level_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import c\n")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import x\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    assert circles(import_graph(pkg)) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    (pkg / "sub" / "c.py").write_text("")
    assert circles(import_graph(pkg)) == []


def test_the_stage_table_drives_the_recipe_runner_and_push():
    assert ORDER == tuple(s.name for s in STAGES) and len(set(ORDER)) == len(ORDER)
    sections = [f.name for f in dataclasses.fields(Recipe)]
    for stage in SECTIONS:  # a recipe section per sectioned stage, of the stage's config type
        assert Recipe.__dataclass_fields__[stage.name].type is stage.config
    assert sections[-len(SECTIONS) - 1:-1] == [s.name for s in SECTIONS] and sections[-1] == "push"
    for stage in STAGES:
        assert callable(stage.run) and dataclasses.is_dataclass(stage.config)
    for stage in CHAINED:  # every stage that reads the previous folder has an `input` key
        assert "input" in {f.name for f in dataclasses.fields(stage.config)}
    recipe = Recipe(model="m", name="r")
    ctx = runner.context(recipe)
    assert ctx.model_folders == MODEL_FOLDERS and set(ctx.inputs) == {s.name for s in CHAINED}


def test_the_format_table_answers_for_every_candidate_method():
    methods = quant_backends.Method.__args__
    assert set(methods) == set(formats.BY_METHOD) == set(quant_backends.BITS)
    hooks = ("holds", "load", "weight_files", "usage", "card_section", "lm_eval_model", "unavailable", "check",
             "unsupported", "convert", "save", "describe", "grid")
    for fmt in formats.FORMATS:
        missing = [h for h in hooks if not callable(getattr(fmt, h, None))]
        assert not missing, f"{fmt.NAME} lacks {missing}"
        assert set(m for ms in fmt.OPTIONS.values() for m in ms) <= set(fmt.METHODS)
    for method in methods:
        cand = quant_backends.Candidate(method)
        assert cand.format is formats.BY_METHOD[method] and cand.bits == quant_backends.BITS[method]
        assert isinstance(quant_backends.describe(cand), str)
    # every option of the schema belongs to some format, and every format option is a schema field
    options = {f.name for f in dataclasses.fields(quant_backends.Candidate)} - {"method", "name"}
    assert options == set(quant_backends.OPTIONS)
