"""Library and OS exceptions a user can fix, turned into one clear StageError: what, where, and the fix.

The CLI passes every exception a run raises through `explain`; what it cannot explain is a bug and is
reported as one. Code that knows more (which data file, which stage folder) calls the helpers here
with that context instead of catching the same exceptions again.
"""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class StageError(Exception):
    """A problem the user can fix (bad input folder, impossible setting); reported without a traceback."""


def chain(err: BaseException):
    """`err` and the exceptions it was raised from (libraries often wrap the one that matters)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


# How libraries that are not Python report a full disk: safetensors' Rust writer raises SafetensorError
# "... IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })", with no OSError
DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded", "QuotaExceeded")


def _says_disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno in DISK_FULL) or any(t in str(e) for t in DISK_FULL_TEXT)


def is_disk_full(err: BaseException) -> bool:
    return any(_says_disk_full(e) for e in chain(err))


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MB"


def free_bytes(folder: Path) -> int | None:
    for p in (Path(folder), *Path(folder).parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return None


def disk_full(folder: Path, written: int, needed: int | None = None) -> StageError:
    free = free_bytes(folder)
    need = (f"it needs about {mb(needed)}" if needed else f"it had written {mb(written)} when the disk filled, "
            "and needs more than that")
    return StageError(
        f"disk full while writing {Path(folder).name.strip('.').removesuffix('.partial')} to '{Path(folder).parent}': "
        f"{need}; {mb(free or 0)} are free there. The partial folder was removed. Free some space (old runs, "
        "~/.cache/huggingface) or set output_dir to a folder on a larger disk, then run the same command again"
    )


def not_writable(path, err: OSError, key: str = "output_dir") -> StageError:
    return StageError(f"{key}: cannot write '{path}' ({err.strerror or err}); set {key} to a folder you can "
                      f"create and write, e.g. {key}=runs (as a command-line override)")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers at all. huggingface_hub retries a dead network for about 90 s before it
    gives up; when this says no, loads use the local cache only and fail at once if it lacks the files."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def hub_unreachable(err: BaseException) -> bool:
    import huggingface_hub.errors as hub_errors

    names = {"ConnectError", "ConnectTimeout", "ConnectionError", "NetworkError", "OfflineModeIsEnabled",
             "LocalEntryNotFoundError", "ProxyError", "NameResolutionError", "MaxRetryError"}
    for e in chain(err):
        if type(e).__name__ in names or isinstance(e, hub_errors.OfflineModeIsEnabled):
            return True
        text = str(e)
        if "couldn't connect to" in text or "offline mode" in text.lower() or "cannot find the requested files in the local cache" in text:
            return True
    return False


def explain(err: BaseException) -> StageError | None:
    """A StageError for an exception with a cause the user can fix, or None (then it is a bug)."""
    if isinstance(err, StageError):
        return err
    for e in chain(err):
        if isinstance(e, StageError):
            return e
        if _says_disk_full(e):
            where = Path(e.filename).parent if getattr(e, "filename", None) else Path.cwd()
            return StageError(f"disk full while writing '{getattr(e, 'filename', None) or where}': "
                              f"{mb(free_bytes(where) or 0)} free; "
                              "free some space or set output_dir to a larger disk, then run the same command again")
        if isinstance(e, OSError) and e.errno in NOT_WRITABLE and e.filename:
            return StageError(f"cannot access '{e.filename}' ({e.strerror}); check its permissions (for output, "
                              "set output_dir to a folder you can write)")
        if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (GPU)
            return StageError("out of GPU memory: lower the stage's batch_size (raise grad_accum to keep the "
                              "effective batch), lower data.block_size, or set gradient_checkpointing: true")
        if isinstance(e, MemoryError):
            return StageError("out of memory: lower the stage's batch_size or data.block_size")
    if hub_unreachable(err):
        return StageError("the Hugging Face Hub is unreachable (offline?); use local model folders and data "
                          "files, or the offline alias smollm2-135m")
    return None


# --- data files -----------------------------------------------------------------------------------------

def data_file(files: list[Path], err: BaseException) -> StageError:
    """Why `datasets` could not read local data files: the file and line, found by reading them again."""
    for path in files:
        problem = file_problem(path)
        if problem:
            return StageError(f"data.source: '{path}' {problem}")
    root = list(chain(err))[-1]
    names = ", ".join(f"'{p}'" for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return StageError(f"data.source: cannot read {names}: {type(root).__name__}: {root}")


def file_problem(path: Path) -> str | None:
    """What is wrong with one data file (empty, not UTF-8, malformed JSON on line N), or None."""
    raw = path.read_bytes()
    if not raw.strip():
        return ("is empty (or holds only whitespace); put documents in it (one per line for .txt, one JSON "
                "object per line for .jsonl) or point data.source at another file")
    if path.suffix == ".parquet":
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return (f"is not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line} (byte offset {e.start}); re-save "
                "the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`")
    if path.suffix in (".json", ".jsonl"):
        return json_problem(text, path.suffix)
    return None


def json_problem(text: str, suffix: str) -> str | None:
    if suffix == ".json" and text.lstrip().startswith("["):  # one JSON array of records
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            return f"is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}; fix it there"
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            return f"must be a JSON array of objects like {{\"text\": ...}}; item {bad} is a {type(rows[bad]).__name__}"
        return None
    kinds: dict[str, tuple[str, int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return (f"line {n} is not valid JSON ({e.msg}, column {e.colno}): {line[:80]!r}; fix or delete that "
                    "line (JSON Lines: one complete JSON object per line)")
        if not isinstance(row, dict):
            return f"line {n} is a JSON {type(row).__name__}, not an object like {{\"text\": ...}}; fix or delete that line"
        for key, value in row.items():
            kind = type(value).__name__ if value is not None else None
            if kind is None:
                continue
            first = kinds.setdefault(key, (kind, n))
            if first[0] != kind and {first[0], kind} != {"int", "float"}:
                return (f"line {n}: key '{key}' holds a {kind}, but on line {first[1]} a {first[0]}; "
                        "each key needs one type in every line")
    return None
