"""Stage folders: written into a hidden `.<stage>.partial` folder and renamed when complete, so that a
stage never consumes a half-written one; what a finished folder holds (the model, `pipeline.json` and the
model card) is written here."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from pipeline import cards, dist, errors, interrupts
from pipeline.records import StageRecord, write_json

_expected_bytes: dict[Path, int] = {}  # staging folder -> bytes its model needs on disk (see save_model)


@contextlib.contextmanager
def staging(final: Path):
    """Yield a temporary sibling folder; on success it atomically replaces `final`, on failure it is removed.

    In a multi-process run only rank 0 writes: the other ranks get a scratch folder that is thrown away
    (the runner makes them wait for rank 0 before they read the finished folder)."""
    if not dist.is_main():
        with tempfile.TemporaryDirectory(prefix=f"{final.name}-rank{dist.rank()}-") as scratch:
            yield Path(scratch)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial"
    if tmp.exists():  # left over from an interrupted run: never consumed, safe to discard
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        yield tmp
        interrupts.raise_pending()  # a Ctrl-C some library swallowed still leaves no folder
    except BaseException as err:
        if any(isinstance(e, KeyboardInterrupt) for e in errors.chain(err)):
            interrupts.delivered()
        written = errors.bytes_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        expected = _expected_bytes.pop(tmp, None)
        if errors.is_disk_full(err):  # an OSError, or a library's own report of it (safetensors' Rust writer)
            raise errors.disk_full(tmp, written, expected) from err
        cause = next((e for e in errors.chain(err) if isinstance(e, OSError)), None)  # libraries wrap it
        if cause is not None and cause.errno in errors.NOT_WRITABLE:
            raise errors.not_writable(cause.filename or tmp, cause) from err
        raise
    _expected_bytes.pop(tmp, None)
    old = final.parent / f".{final.name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_model(folder: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """Weights (safetensors), config and tokenizer; rank 0 only, as `Trainer.save_model` does.
    `state_dict`: weights gathered from FSDP/DeepSpeed ranks, when `model` holds only a shard."""
    if not dist.is_main():
        return
    need = model.get_memory_footprint() if hasattr(model, "get_memory_footprint") else None
    if need:
        _expected_bytes[Path(folder)] = need  # for the disk-full message, if the disk fills while writing
        free = errors.free_bytes(folder)
        if free is not None and free < need * 1.05:
            raise errors.disk_full(Path(folder), 0, need)
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def write_record(folder: Path, record: StageRecord) -> None:
    """pipeline.json and the model card rebuilt from it (rank 0 only, like every write)."""
    if not dist.is_main():
        return
    cards.write_card(folder, write_json(folder, record))
