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


def bytes_under(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when it is not there): what a write had done when it failed."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else 0


def disk_full(folder: Path, written: int, needed: int | None = None, what: str | None = None,
              cleanup: str = "The partial folder was removed. ") -> StageError:
    """The one disk-full message of every write the pipeline makes: what it was writing and where, the space it
    needs (or, when that cannot be known, what it had written) and the space free there."""
    free = free_bytes(folder)
    if needed:
        need = f"it needs about {mb(needed)}"
    elif written:
        need = f"it had written {mb(written)} when the disk filled, and needs more than that"
    else:  # nothing written yet, and a write of unknown size
        need = "how much it needs is not known here"
    what = what or Path(folder).name.strip(".").removesuffix(".partial")
    return StageError(
        f"disk full while writing {what} to '{Path(folder).parent}': {need}; {mb(free or 0)} are free there. "
        f"{cleanup}Free some space (old runs, ~/.cache/huggingface) or set output_dir to a folder on a larger disk, "
        "then run the same command again"
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
        if _says_disk_full(e):  # a write no stage code knows the size of (a report, a library's cache)
            name = getattr(e, "filename", None)
            return disk_full(Path(name or Path.cwd() / "-"), 0, what=f"'{Path(name).name}'" if name else "a file",
                             cleanup="")
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

# What each reader expects, named in every message about a file it cannot read
FORMS = {".txt": "UTF-8 text, one document per line",
         ".jsonl": 'JSON Lines: one JSON object per line, like {"text": ...}',
         ".json": 'a JSON array of objects, [{"text": ...}, ...], or JSON Lines',
         ".csv": "comma-separated columns under a header row (text,...), in UTF-8",
         ".parquet": "a Parquet table"}
# `validate` reads a data file whole (UTF-8, every JSON line, every CSV row) up to this size; a larger one gets the
# checks that read its first bytes only (a CSV's header, a Parquet's schema), except JSON, read line by line for the
# keys of every row; the rest is said when a stage reads it and `datasets` fails
FULL_CHECK_BYTES = 32 * 2**20
SEPARATORS = {";": "semicolons", "\t": "tabs", "|": "bars"}


def data_file(files: list[Path], err: BaseException) -> StageError:
    """Why `datasets` could not read local data files: the file and line, found by reading them again."""
    for path in files:
        problem = file_problem(path)
        if problem:
            return StageError(f"data.source: '{path}' {problem}")
    root = list(chain(err))[-1]
    names = ", ".join(f"'{p}'" for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return StageError(f"data.source: cannot read {names} ({type(root).__name__}: {root}); expected "
                      f"{FORMS.get(files[0].suffix, 'a data file')}. Fix the file, or save the data as JSON Lines")


def file_problem(path: Path, whole: bool = True) -> str | None:
    """What is wrong with one data file (empty, not UTF-8, malformed JSON on line N, ...) with the form expected
    and the fix, or None. `whole=False` (recipe validation) reads a file larger than FULL_CHECK_BYTES only at its
    start (and a Parquet file's end)."""
    return file_check(path, whole)[0]


def file_check(path: Path, whole: bool = True) -> tuple[str | None, dict[str, bool] | None]:
    """file_problem, and the columns the file's reader will give (name: whether it holds text), from what the
    checks read anyway: a CSV header, a Parquet schema (metadata only), the keys of every JSON row (`datasets`
    makes a column of a key any row has). None where they are not known: a problem, a large JSON file read
    only at its start."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(64 * 1024)
        tail = f.seek(max(size - 4, 0)) is not None and f.read(4)
    if not head.strip():
        return ("is empty (or holds only whitespace); put documents in it (one per line for .txt, one JSON "
                "object per line for .jsonl) or point data.source at another file"), None
    if path.suffix == ".parquet":
        if head[:4] != b"PAR1" or tail != b"PAR1":  # every Parquet file starts and ends with these bytes
            return (f"is not a Parquet file (it does not start and end with PAR1: {head[:12]!r}...); expected "
                    f"{FORMS['.parquet']}: write it with pandas' DataFrame.to_parquet, or give the file its real "
                    "extension (.jsonl, .csv, .txt)"), None
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        return None, {f.name: pa.types.is_string(f.type) or pa.types.is_large_string(f.type) for f in schema}
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # a byte-order mark: UTF-16, as Windows' Notepad saves "Unicode"
        return ("is UTF-16 text, not UTF-8 (it starts with a UTF-16 byte-order mark); re-save it as UTF-8, e.g. "
                "`iconv -f utf-16 -t utf-8 in.txt > out.txt`"), None
    if path.suffix == ".csv" and (problem := csv_separator_problem(head.decode("utf-8", "replace"))):
        return problem, None
    if not whole and size > FULL_CHECK_BYTES:
        if path.suffix in (".json", ".jsonl"):  # the columns a recipe needs may first appear in any row
            if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                return file_check(path, whole=True)  # one JSON array: `datasets` reads it whole into memory too
            return _large_json_lines(path)
        return None, csv_header(head.decode("utf-8", "replace")) if path.suffix == ".csv" else None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a UTF-8 byte-order mark: every reader skips it
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return (f"is not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line} (byte offset {e.start}); re-save "
                "the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"), None
    if path.suffix in (".json", ".jsonl"):
        return json_problem(text, path.suffix)
    if path.suffix == ".csv":
        problem = csv_problem(text)
        return problem, None if problem else csv_header(text)
    return None, {"text": True}  # the text reader's one column


def _large_json_lines(path: Path) -> tuple[str | None, dict[str, bool] | None]:
    """A JSON Lines file too large to read whole, checked line by line: every line, and the keys of every row.
    Memory stays one line; the time is about a second per 100 MB, once per version of the file (data.py caches
    it). A first line that is not JSON may be one object spread over many lines: the whole-file check says which."""
    keys: dict[str, bool] = {}
    try:
        with path.open(encoding="utf-8-sig") as f:  # (a UTF-8 byte-order mark: every reader skips it)
            problem = _json_lines_problem(f, FORMS[path.suffix], keys)
    except UnicodeDecodeError:
        return file_check(path, whole=True)  # it names the byte and its line
    if problem is not None and problem.startswith("line 1 is not valid JSON"):
        return file_check(path, whole=True)
    return problem, None if problem else keys


def csv_header(text: str) -> dict[str, bool]:
    """The columns under a CSV header row (the first row that is not blank, as pandas reads it)."""
    import csv
    import io

    header = next((row for row in csv.reader(io.StringIO(text.removeprefix("\ufeff"))) if row), [])
    return dict.fromkeys(header, True)  # every CSV value is read as text unless it parses as a number


def csv_separator_problem(head: str) -> str | None:
    """A `.csv` file separated by something else than commas (a spreadsheet's export in many locales): read as
    comma-separated, its header becomes one column named 'id;text'. The sniffer decides where the first lines
    agree; else a header with no comma but a semicolon, tab or bar says it."""
    import csv

    header = head.splitlines()[0] if head.splitlines() else ""
    try:
        found = csv.Sniffer().sniff(head[: head.rfind("\n") + 1] or head, delimiters=",;\t|").delimiter
    except csv.Error:  # one column, or lines that do not agree
        found = None
    if found in (None, ",") and "," not in header:
        found = next((d for d in SEPARATORS if d in header), None)
    return separated_by(found, header) if found in SEPARATORS else None


def separated_by(sep: str, header: str) -> str:
    return (f"looks {sep!r}-separated ({SEPARATORS[sep]}, not commas: its header reads {header[:60]!r}), and the "
            "CSV reader splits on commas; save it comma-separated (in pandas: "
            f"pd.read_csv(path, sep={sep!r}).to_csv(path, index=False)), or as .jsonl or .parquet")


def csv_problem(text: str) -> str | None:
    """A CSV the reader refuses or misreads: a header with no rows, a row with more fields than the header, a
    quote that is never closed (each with its line)."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text), strict=True)
    header, rows, line = None, 0, 1
    try:
        for row in reader:
            if row and header is None:
                header = row
            elif row and len(row) > len(header):
                return (f"line {line} has {len(row)} fields, but the header has {len(header)} "
                        f"({', '.join(header)[:60]}); quote a field that holds a comma (\"like, this\"), or fix "
                        f"that line. Expected {FORMS['.csv']}")
            elif row:
                rows += 1
            line = reader.line_num + 1
    except csv.Error as e:
        return (f"line {line}: {e}: a quoted field starts there and its quote is never closed; close it, or double "
                f"each quote inside a quoted field (\"\"). Expected {FORMS['.csv']}")
    if not rows:
        return (f"holds a header row ({', '.join(header)[:60]}) and no rows under it; add one row per document. "
                f"Expected {FORMS['.csv']}")
    return None


def json_problem(text: str, suffix: str) -> tuple[str | None, dict[str, bool] | None]:
    """A .json / .jsonl file `datasets` refuses or misreads, and the keys of its rows (name: whether a row holds
    text in it; None with a problem). It reads a JSON array of records and JSON Lines under either extension, so
    the content decides which form is checked."""
    keys: dict[str, bool] = {}
    problem = _json_problem(text, suffix, keys)
    return problem, None if problem else keys


def _json_problem(text: str, suffix: str, keys: dict[str, bool]) -> str | None:
    """json_problem's checks; `keys` gets the key of every row read (a key holding only nulls is still a column)."""
    form = FORMS[suffix]
    if text.lstrip().startswith("["):  # one JSON array of records
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            return (f"is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}; fix it there (it starts with '[', "
                    f"so it is read as one JSON array; expected {form})")
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            return f"must be a JSON array of objects like {{\"text\": ...}}; item {bad} is a {type(rows[bad]).__name__}"
        for row in rows:
            _keys_of(row, keys)
        return None
    if text.lstrip().startswith("{") and len(text.strip().splitlines()) > 1:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:  # JSON Lines, or broken: the lines say which
            whole = None
        if isinstance(whole, dict):  # one object spread over lines: `datasets` reads it as a single row
            under = next((k for k, v in whole.items() if isinstance(v, list) and v
                          and all(isinstance(r, dict) for r in v)), None)
            fix = (f"the records look to be under '{under}': `jq -c '.{under}[]' in.json > out.jsonl` writes them as "
                   "JSON Lines" if under else "write one object per document")
            return (f"holds one JSON object over {len(text.strip().splitlines())} lines (keys: "
                    f"{', '.join(list(whole)[:6])}), which reads as a single row; expected {form}; {fix}")
    return _json_lines_problem(text.splitlines(), form, keys)


def _json_lines_problem(lines, form: str, keys: dict[str, bool]) -> str | None:
    """The JSON Lines checks of _json_problem over any iterable of lines (a file read line by line included)."""
    kinds: dict[str, tuple[str, int]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return (f"line {n} is not valid JSON ({e.msg}, column {e.colno}): {line[:80]!r}; fix or delete that "
                    f"line (expected {form})")
        if not isinstance(row, dict):
            return f"line {n} is a JSON {type(row).__name__}, not an object like {{\"text\": ...}}; fix or delete that line"
        _keys_of(row, keys)
        for key, value in row.items():
            kind = type(value).__name__ if value is not None else None
            if kind is None:
                continue
            first = kinds.setdefault(key, (kind, n))
            if first[0] != kind and {first[0], kind} != {"int", "float"}:
                return (f"line {n}: key '{key}' holds a {kind}, but on line {first[1]} a {first[0]}; "
                        "each key needs one type in every line")
    return None


def _keys_of(row: dict, keys: dict[str, bool]) -> None:
    for key, value in row.items():
        keys[key] = keys.get(key, False) or isinstance(value, str)
