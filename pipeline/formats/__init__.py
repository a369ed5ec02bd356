"""Output formats: one module per kind of model folder a stage can write. Each format module owns
everything about its folders: whether a folder is one (`holds`), loading it (`load`), its weight files, the
model card's loading snippet (`usage`, `card_section`), the lm-eval model over it (`lm_eval_model`), and the
quantize candidates that write it (`METHODS`, `OPTIONS`, `PACKAGES`, `unavailable`, `check`, `convert`,
`save`, `describe`, `grid`). Adding a format is a module and a row in FORMATS."""
from __future__ import annotations

from pathlib import Path

from pipeline.formats import gguf, openvino, transformers
from pipeline.models import ModelSourceError

FORMATS = (transformers, openvino, gguf)
BY_NAME = {f.NAME: f for f in FORMATS}
BY_METHOD = {method: f for f in FORMATS for method in f.METHODS}


def of_folder(folder: str | Path):
    """The format module of a model folder (or of a .gguf file); None if it is none of them. The plain
    transformers folder is the fallback: the others may hold a config.json too."""
    special = next((f for f in FORMATS if f is not transformers and f.holds(Path(folder))), None)
    return special or (transformers if transformers.holds(Path(folder)) else None)


def load_folder(folder: str | Path, **kwargs):
    """Model and tokenizer from a stage folder written by this pipeline (transformers, OpenVINO or GGUF), or
    any model folder; `kwargs` are transformers loading options (device_map, dtype, ...)."""
    fmt = of_folder(folder)
    if fmt is None:
        raise ModelSourceError(f"'{folder}' is not a model folder (no config.json, no .gguf file); give a stage "
                               "output folder such as runs/quickstart/finetune")
    return fmt.load(Path(folder), **kwargs)


def _format(folder: str | Path):
    """The folder's format; a folder none of them claims (an adapter beside merged weights, say) is read as a
    transformers folder."""
    return of_folder(folder) or transformers


def disk_size(folder: str | Path) -> int:
    """Bytes of the weight files in a model folder (what a user loads to run it)."""
    folder = Path(folder)
    if folder.is_file():
        return folder.stat().st_size
    return sum(p.stat().st_size for p in _format(folder).weight_files(folder))


def disk_mb(folder: str | Path) -> float:
    """`disk_size` in MB (2^20 bytes), to the hundredth, as every table shows it."""
    return round(disk_size(folder) / 2**20, 2)


def weight_stamps(folder: str | Path) -> list[tuple[str, int, int]]:
    """(name, bytes, modification time) of each weight file: changes whenever the weights are written again, and
    survives moving the folder on one disk (a rename keeps both)."""
    files = sorted(_format(Path(folder)).weight_files(Path(folder)))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def usage(folder: str | Path, ref: str) -> str:
    """A loading snippet for the folder's format, naming `ref` (a path or repo id) as the model."""
    return _format(folder).usage(Path(folder), ref)


def card_section(folder: str | Path, repo_id: str | None) -> str:
    """More for the model card, where the format has more ways to run it (llama.cpp, Ollama)."""
    return _format(folder).card_section(Path(folder), repo_id)


def lm_eval_model(model, tokenizer, folder: str | Path, batch_size: int):
    """The lm-eval model over an evaluated model folder."""
    return _format(folder).lm_eval_model(model, tokenizer, Path(folder), batch_size)
