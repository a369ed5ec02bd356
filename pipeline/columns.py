"""What the text and chat data paths share: the data files a `data.source` names, and checks on the columns
and rows of a loaded split."""
from __future__ import annotations

import glob
from pathlib import Path

from pipeline import errors
from pipeline.errors import StageError

LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def local_files(source: str) -> list[Path] | None:
    """The data files a local `source` names: a file, a folder (its data files) or a glob pattern
    (data/*.jsonl); None when `source` is the stdlib corpus or a Hub dataset name."""
    if source == "stdlib":
        return None
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_FORMATS
                      and not p.name.startswith("."))
    if path.suffix in LOCAL_FORMATS or source.startswith((".", "/", "~")) or path.exists():
        return [path]
    return None


def unread(source: str) -> list[str]:
    """What a folder `source` holds that is not read: files of other types and sub-folders (only the folder's own
    data files are)."""
    path = Path(source).expanduser()
    if any(c in source for c in "*?[") or not path.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                  if not p.name.startswith(".") and (p.is_dir() or p.suffix not in LOCAL_FORMATS))


def _is_text(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def describe(feature) -> str:
    dtype = getattr(feature, "dtype", None)
    return f"{dtype} values" if dtype else f"values of type {type(feature).__name__} ({feature})"


def columns_of(split) -> dict[str, bool]:
    """A loaded split's columns, each with whether it holds text."""
    return {c: _is_text(split.features[c]) for c in split.column_names}


def missing_column(column: str, found: dict[str, bool], key: str, where: str) -> str:
    """Why data lacks `column`, with the key to set: said by the run (about a loaded split) and by `validate`
    (about a file's header, schema or row keys). `found` maps each column to whether it holds text."""
    # a header the comma reader left whole ('id;text'), though it holds the column: the file's separator is another
    glued = next(((c, sep) for c in found for sep in errors.SEPARATORS if column in c.split(sep)), None)
    if glued:
        return (f"{key}: column '{column}' not found, but a column is named '{glued[0]}': "
                f"'{where}' {errors.separated_by(glued[1], ','.join(found))}")
    example = next((c for c, text in found.items() if text), next(iter(found), "text"))
    return (f"{key}: column '{column}' not in '{where}'; its columns are: {', '.join(found)}. Set {key} to one of "
            f"them, e.g. `{key}: {example}`")


def missing_columns(cfg, found: dict[str, bool], where: str, prefix: str = "data") -> str | None:
    """Why data with columns `found` lacks what `cfg` (a DataConfig, recipe key `prefix`) reads from it, if it
    does: the text column, or for chat a messages column or both a prompt and a response column."""
    if cfg.format != "chat":
        return None if cfg.text_column in found else missing_column(cfg.text_column, found, f"{prefix}.text_column",
                                                                     where)
    if cfg.messages_column in found or {cfg.prompt_column, cfg.response_column} <= set(found):
        return None
    return (f"{prefix}.format chat: '{where}' has columns {', '.join(found)}; it needs a '{cfg.messages_column}' "
            f"column (list of {{role, content}}) or '{cfg.prompt_column}' and '{cfg.response_column}' columns. Name "
            f"yours with {prefix}.messages_column, {prefix}.prompt_column and {prefix}.response_column, or use "
            f"{prefix}.format: text")


def require_text_column(split, column: str, key: str, cfg) -> None:
    """`column` of a loaded split holds text in every row; else a StageError naming the key, file and row."""
    if column not in split.column_names:
        raise StageError(missing_column(column, columns_of(split), f"data.{key}", cfg.source))
    if not _is_text(split.features[column]):
        texts = [c for c in split.column_names if _is_text(split.features[c])]
        # mixed types in a JSON column: the line where its type changes is the one to fix
        files = [f for f in local_files(cfg.source) or [] if f.suffix in (".json", ".jsonl") and f.is_file()]
        where = next((f" ('{f}' {problem})" for f in files if (problem := errors.file_problem(f))), "")
        raise StageError(f"data.{key}: column '{column}' of '{cfg.source}' holds {describe(split.features[column])}, "
                         f"not text{where}; fix the data, or set data.{key} to a text column"
                         + (f" ({', '.join(texts)})" if texts else " (this data has none)"))
    values = split.data.column(column)  # the table under the split: row numbers are the file's
    if values.null_count:
        import pyarrow.compute as pc

        first = pc.index(pc.is_null(values), True).as_py()
        raise StageError(f"data.{key}: {values.null_count} of {len(values)} rows of '{cfg.source}' have no "
                         f"'{column}' (the first is row {first + 1}); give every row one, or remove those rows")


def cap_train(dsd, limit: int | None):
    """At most `limit` rows of the train split (a DatasetDict) or of a single Dataset."""
    if limit is None:
        return dsd
    if hasattr(dsd, "keys"):
        if len(dsd["train"]) > limit:
            dsd["train"] = dsd["train"].select(range(limit))
        return dsd
    return dsd.select(range(limit)) if len(dsd) > limit else dsd
