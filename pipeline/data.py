"""Text data: Hub datasets, local files or the stdlib corpus → deterministic split → packed blocks.
Chat data (`format: chat`) is rendered with a chat template and tokenized by `pipeline.chat`."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from pipeline import chat, errors
from pipeline.columns import LOCAL_FORMATS, cap_train, local_files, missing_columns, require_text_column, unread
from pipeline.errors import StageError

log = logging.getLogger("pipeline")

@dataclass
class MixSource:
    """One more text source mixed into the training blocks (validation stays the main source's)."""

    source: str  # a Hub dataset name or a local .txt/.jsonl/.csv/.parquet file ("stdlib": the offline corpus)
    weight: float = 1.0  # share of the training blocks, relative to the main source's weight of 1
    config: str | None = None  # Hub dataset configuration
    split: str = "train"
    text_column: str = "text"

    def check(self) -> list[str]:
        problems = [] if self.weight > 0 else [f"weight: {self.weight} must be positive"]
        return problems + DataConfig(source=self.source).check()


@dataclass
class DataConfig:
    # `stdlib` (offline corpus), a Hub dataset (`wikitext`), or local `.txt`/`.jsonl`/`.csv`/`.parquet` data: a file,
    # a folder of them (its own files; a warning names what else it holds), or a glob (`data/**/*.jsonl`)
    source: str = "stdlib"
    config: str | None = None  # Hub dataset configuration, e.g. `wikitext-2-raw-v1`
    split: str = "train"  # split to train on
    validation_split: str | None = None  # use this split for validation instead of holding out documents
    validation_percent: float = 10.0  # % of documents held out (deterministic, seeded) when no validation split is set
    text_column: str = "text"  # column holding the text
    # tokens per packed training block (documents are joined with EOS and cut, as `run_clm.py` does; chat: the
    # longest example, longer ones are cut)
    block_size: int = 256
    max_train_blocks: int | None = None  # cap on training blocks (chat: conversations), for quick runs
    # `text`, or `chat`: conversations rendered with a chat template, loss on the assistant's tokens only
    format: Literal["text", "chat"] = "text"
    messages_column: str = "messages"  # chat: column holding a list of `{role, content}` turns ...
    prompt_column: str = "prompt"  # ... or a prompt column ...
    response_column: str = "response"  # ... and a response column (one user turn, one assistant turn)
    # chat: a Jinja template; null = the tokenizer's own (an error names this key if it has none)
    chat_template: str | None = None
    # chat: a row a trainer would misuse (a turn of unknown role, empty or null content, no assistant turn, an
    # empty response): `error` names the first; `drop` leaves them all out with a warning that counts them by cause
    bad_rows: Literal["error", "drop"] = "error"
    # more text sources sampled into the training blocks: `[{source, weight, config, split, text_column}]`; each
    # source's blocks are drawn with probability weight / total (the main source weighs 1) until one runs out;
    # validation stays the main source's
    mix: list[MixSource] = field(default_factory=list)

    def check(self) -> list[str]:
        problems = []
        if not 0 < self.validation_percent < 100:
            problems.append(f"validation_percent: {self.validation_percent} must be between 0 and 100")
        if self.block_size < 8:
            problems.append(f"block_size: {self.block_size} is too small; use at least 8")
        files = local_files(self.source)
        if files is not None:
            problems += [f"source: {p}" for p in local_problems(self.source, files)]
        if self.mix and self.format == "chat":
            problems.append("mix: mixing sources works for text data only; remove mix or use format: text")
        return problems

    @property
    def label(self) -> str:
        """Dataset name for model cards."""
        if self.source == "stdlib":
            return "python-stdlib-pydoc-topics"
        if local_files(self.source) is None:
            return self.source
        return Path(self.source).name or self.source


def local_problems(source: str, files: list[Path]) -> list[str]:
    """Why local `files` (from `local_files(source)`) cannot be read as one data set, if they cannot."""
    kinds = ", ".join(LOCAL_FORMATS)
    if not files:
        path = Path(source).expanduser()
        if path.is_dir():
            held = sorted(p.name for p in path.iterdir())[:5]
            return [f"folder '{source}' holds no data files ({kinds})"
                    + (f"; it holds {', '.join(held)}" if held else ", it is empty")]
        return [f"'{source}' matches no files; check the pattern, or name a file or folder of {kinds} files"]
    problems = [f"file '{p}' does not exist" for p in files if not p.is_file()]
    problems += [f"unsupported file type '{p.suffix or p.name}' ('{p}'); use one of {kinds}"
                 for p in files if p.suffix not in LOCAL_FORMATS]
    problems += [f"'{p}' {problem}" for p in files if p.suffix in LOCAL_FORMATS and p.is_file()
                 and (problem := _file_check(str(p), *_stamp(p))[0])]
    builders = {LOCAL_FORMATS[p.suffix] for p in files if p.suffix in LOCAL_FORMATS}
    if len(builders) > 1:
        problems.append(f"'{source}' mixes file types ({', '.join(sorted({p.suffix for p in files}))}); "
                        "use one type per source, and data.mix to add another")
    return problems


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _file_check(path: str, size: int, mtime_ns: int) -> tuple[str | None, dict[str, bool] | None]:
    """errors.file_check without reading a large file whole, once per version of the file: a recipe checks the
    same source for data, prune.data and distill.data, for its problems and then for its columns."""
    return errors.file_check(Path(path), whole=False)


def _columns_read(cfg: DataConfig) -> tuple:
    """What missing_columns reads of a config: two configs equal in it need the same columns of the same files."""
    return cfg.source, cfg.format, cfg.text_column, cfg.messages_column, cfg.prompt_column, cfg.response_column


def column_problems(cfg: DataConfig, prefix: str, skip: DataConfig | None = None) -> list[str]:
    """The columns `cfg` (recipe key `prefix`) reads that its local files lack, and each `mix` source's text
    column, from what validate read of the files (header, schema, row keys) with the rule the run applies to the
    loaded data (columns.missing_columns), so that a run is never refused here that the run would accept. A
    source whose files have problems is left out: DataConfig.check names them, as are the source and mix entries
    `cfg` shares with `skip` (those of another config checked too)."""
    sources = [(prefix, cfg)] + [(f"{prefix}.mix[{i}]", replace(cfg, source=m.source, text_column=m.text_column))
                                 for i, m in enumerate(cfg.mix if cfg.format == "text" else [])
                                 if skip is None or m not in skip.mix]
    if skip is not None and _columns_read(cfg) == _columns_read(skip):
        sources = sources[1:]
    problems = []
    for key, one in sources:
        files = local_files(one.source)
        if not files or local_problems(one.source, files):
            continue
        found = ((p, _file_check(str(p), *_stamp(p))[1]) for p in files)
        problems += [problem for p, columns in found if columns is not None
                     and (problem := missing_columns(one, columns, str(p), key))][:1]  # one file says it for its source
    return problems


def _cache_dir() -> Path:
    root = Path(os.environ.get("PIPELINE_CACHE", Path.home() / ".cache" / "llm-pipeline"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def stdlib_corpus_file() -> Path:
    """The stdlib's pydoc topics (English prose about Python) as JSONL, so `datasets` caches it like any file."""
    from pydoc_data.topics import topics

    out = _cache_dir() / f"pydoc_topics_py{sys.version_info.major}{sys.version_info.minor}.jsonl"
    if not out.exists():
        tmp = out.with_suffix(f".{os.getpid()}.tmp")  # ranks of a multi-process run may both write it
        with tmp.open("w") as fh:
            for key in sorted(topics):
                fh.write(json.dumps({"text": topics[key], "topic": key}) + "\n")
        tmp.replace(out)
    return out


def stamps(*configs) -> list:
    """(file, size, mtime) of every local data file the configs read (their sources and mixes): a stage's
    fingerprint includes them, so a data file edited in place makes the stages that read it run again. Cheap for
    large files (no hashing). The stdlib corpus and Hub datasets give none: the first is fixed by the Python
    version, the second versioned by `datasets`' own cache."""
    out = []
    for cfg in configs:
        if cfg is None:
            continue
        for source in [cfg.source, *(m.source for m in cfg.mix)]:
            for path in local_files(source) or []:
                if path.is_file():
                    out.append((str(path), *_stamp(path)))
    return out


def load_splits(cfg: DataConfig, seed: int):
    """Return a DatasetDict with `train` and `validation` splits of raw documents."""
    import datasets

    files = [stdlib_corpus_file()] if cfg.source == "stdlib" else local_files(cfg.source)
    if files is not None:
        ds = read_local(cfg.source, files)
    else:
        try:
            ds = datasets.load_dataset(cfg.source, cfg.config, split=cfg.split)
            if cfg.validation_split:
                val = datasets.load_dataset(cfg.source, cfg.config, split=cfg.validation_split)
                return _checked(datasets.DatasetDict(train=ds, validation=val), cfg)
        except StageError:
            raise
        except Exception as err:  # datasets raises many types; the user needs one message
            why = "the Hugging Face Hub is unreachable" if errors.hub_unreachable(err) else str(err)
            raise StageError(
                f"data.source: could not load Hub dataset '{cfg.source}' (config {cfg.config!r}, split "
                f"{cfg.split!r}): {why}. Offline? use a local file, folder or glob (data/*.jsonl), or "
                "data.source=stdlib"
            ) from err
    # columns first: a split of the wrong data helps nobody (and rows that data.bad_rows leaves out go before it)
    ds = _checked(datasets.DatasetDict(train=ds), cfg)["train"]
    require_documents(len(ds), cfg)
    parts = ds.train_test_split(test_size=cfg.validation_percent / 100, seed=seed, shuffle=True)
    split = datasets.DatasetDict(train=parts["train"], validation=parts["test"])
    # every row was checked above; text is checked again for a training split the hold-out left without text
    return _checked(split, cfg) if cfg.format == "text" else split


_said_unread: set[str] = set()


def read_local(source: str, files: list[Path]):
    """Local data files as one Dataset; a file `datasets` cannot read is named with its line and the fix."""
    import datasets

    problems = local_problems(source, files)  # checked with the recipe too; files may have changed since
    if problems:
        raise StageError(f"data.source: {problems[0]}")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log of the failure would only repeat ours
    try:
        ds = datasets.load_dataset(LOCAL_FORMATS[files[0].suffix], data_files=[str(p) for p in files], split="train")
    except Exception as err:  # datasets wraps every reader's error in DatasetGenerationError
        raise errors.data_file(files, err) from err
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(ds) == 0:
        raise StageError(f"data.source: '{source}' holds no documents; put data in it or point data.source elsewhere")
    skipped = unread(source)
    if skipped and source not in _said_unread:  # a README beside the data is normal; documents in another
        # format or a sub-folder may not be (said once a run: several stages read the same source)
        _said_unread.add(source)
        log.warning("data: read the %d %s file(s) of '%s'; not read: %s%s (formats read: %s; sub-folders: use a glob "
                    "such as '%s/**/*%s')", len(files), files[0].suffix, source, ", ".join(skipped[:5]),
                    f" and {len(skipped) - 5} more" if len(skipped) > 5 else "", ", ".join(LOCAL_FORMATS),
                    source.rstrip("/"), files[0].suffix)
    return ds


def min_documents(validation_percent: float) -> int:
    """Fewest documents that leave at least one in both splits (train_test_split rounds the test part up)."""
    n = 2
    while n - math.ceil(n * validation_percent / 100) < 1:
        n += 1
    return n


def require_documents(n: int, cfg: DataConfig) -> None:
    need = min_documents(cfg.validation_percent)
    if n < need:
        unit = "conversation" if cfg.format == "chat" else "document"
        where = " (a .txt file holds one per line)" if any(p.suffix == ".txt" for p in local_files(cfg.source) or []) else ""
        raise StageError(
            f"data: '{cfg.source}' holds {n} {unit}(s){where}, too few for both a training and a validation split: "
            f"data.validation_percent {cfg.validation_percent:g} needs at least {need}. Add {unit}s, or change "
            "data.validation_percent"
        )


def _checked(dsd, cfg: DataConfig):
    if cfg.format == "chat":
        return chat.check_columns(dsd, cfg)
    for split in dsd.values():
        require_text_column(split, cfg.text_column, "text_column", cfg)
    train = dsd["train"].data.column(cfg.text_column)
    import pyarrow.compute as pc

    if len(train) and not pc.max(pc.utf8_length(pc.utf8_trim_whitespace(train))).as_py():
        raise StageError(f"data.text_column: every '{cfg.text_column}' of '{cfg.source}' is empty or whitespace; "
                         "put text in it, or set data.text_column to the column that holds it")
    return dsd


def tokenize(dsd, tokenizer, cfg: DataConfig):
    """Tokenize documents, appending EOS so packed documents stay separated (cached by `datasets`).
    Chat data gets `labels` too: the token ids of the assistant's turns, -100 elsewhere."""
    if cfg.format == "chat":
        return chat.tokenize(dsd, tokenizer, cfg)
    eos = tokenizer.eos_token_id
    column = cfg.text_column

    def encode(batch):
        ids = tokenizer(batch[column], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    return dsd.map(
        encode, batched=True, remove_columns=dsd["train"].column_names, desc="Tokenizing",
        load_from_cache_file=True,
    )


def pack(tokenized, block_size: int, max_blocks: int | None = None):
    """Concatenate and cut into `block_size` blocks, as run_clm.py's group_texts does (no padding).
    Masked labels (chat data) stay masked; `max_blocks` caps the train split."""

    def group(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        labels = [t for ids in batch.get("labels", batch["input_ids"]) for t in ids]
        usable = len(flat) // block_size * block_size
        cut = range(0, usable, block_size)
        return {"input_ids": [flat[i : i + block_size] for i in cut],
                "labels": [labels[i : i + block_size] for i in cut]}

    packed = tokenized.map(group, batched=True, batch_size=1000, desc=f"Packing into {block_size}-token blocks")
    return cap_train(packed, max_blocks)


def text_blocks(cfg: DataConfig, tokenizer, seed: int, counts: dict | None = None):
    """Packed train/validation blocks of `cfg`'s text; `cfg.mix` sources are interleaved into the train
    split with probabilities proportional to their weights (the main source weighs 1) until one runs out.
    `counts`, if given, receives the number of training blocks taken from each source."""
    import datasets

    blocks = pack(prepare(cfg, tokenizer, seed), cfg.block_size)
    labels = [cfg.label]
    if cfg.mix:
        parts, weights = [blocks["train"]], [1.0]
        for extra in cfg.mix:
            one = replace(cfg, source=extra.source, config=extra.config, split=extra.split,
                          text_column=extra.text_column, validation_split=None, mix=[])
            parts.append(pack(prepare(one, tokenizer, seed), cfg.block_size)["train"])
            weights.append(extra.weight)
            labels.append(one.label)
        parts = [p.add_column("mix_source", [i] * len(p)) for i, p in enumerate(parts)]
        total = sum(weights)
        blocks["train"] = datasets.interleave_datasets(parts, probabilities=[w / total for w in weights], seed=seed,
                                                       stopping_strategy="first_exhausted")
    blocks = cap_train(blocks, cfg.max_train_blocks)
    if cfg.mix:
        sources = blocks["train"]["mix_source"]
        blocks["train"] = blocks["train"].remove_columns("mix_source")
    else:
        sources = [0] * len(blocks["train"])
    if counts is not None:
        counts.update({label: sources.count(i) for i, label in enumerate(labels)})
    return blocks


def require_rows(sets, splits, stage: str, cfg: DataConfig, unit: str = "blocks") -> None:
    """Fail before training when a split the stage trains or evaluates on came out empty."""
    for name in splits:
        if len(sets[name]) == 0 and unit == "examples":
            raise StageError(f"{stage}: no conversation of the {name} split of '{cfg.source}' keeps an assistant "
                             f"token within data.block_size {cfg.block_size}; raise data.block_size, or "
                             "data.validation_percent for a larger validation split")
        if len(sets[name]) == 0:
            raise StageError(f"{stage}: the {name} split of '{cfg.source}' has no complete {unit} of "
                             f"data.block_size {cfg.block_size} tokens; use more data, a smaller data.block_size"
                             + (" or a larger data.validation_percent" if name == "validation" else ""))


def eval_stream(tokenized_validation) -> list[int]:
    """The validation documents as one token stream, for sliding-window perplexity."""
    return [t for ids in tokenized_validation["input_ids"] for t in ids]


def prepare(cfg: DataConfig, tokenizer, seed: int):
    """Raw splits → tokenized splits; the caller packs or streams them."""
    tokenized = tokenize(load_splits(cfg, seed), tokenizer, cfg)
    import pyarrow.compute as pc

    lengths = pc.list_value_length(tokenized["validation"].data.column("input_ids"))
    if len(lengths) == 0 or (pc.sum(lengths).as_py() or 0) < 2:
        raise StageError(
            f"data: the validation split of '{cfg.source}' has {pc.sum(lengths).as_py() or 0} token(s) after "
            f"tokenization ({len(lengths)} documents), too few to score; raise data.validation_percent or use "
            "more data"
        )
    return tokenized


def calibration_blocks(cfg: DataConfig, tokenizer, seed: int, n: int, key: str,
                       block_size: int | None = None) -> "torch.Tensor":
    """n blocks of `block_size` (default data.block_size) tokens drawn (seeded) from the training split:
    never the validation split, which the evaluate stage and the quantize gate score. `key` is the recipe
    key that asked for them, named in messages."""
    import torch

    block_size = block_size or cfg.block_size
    if cfg.mix:  # the same weighted interleaving of sources as the training blocks
        blocks = text_blocks(replace(cfg, block_size=block_size), tokenizer, seed)["train"].select_columns(["input_ids"])
    else:
        blocks = pack(prepare(cfg, tokenizer, seed)["train"].select_columns(["input_ids"]), block_size)
    if len(blocks) == 0:
        raise StageError(f"{key}: the training split of '{cfg.source}' has no block of {block_size} tokens to "
                         "calibrate on; use more data or smaller blocks")
    if len(blocks) < n:
        log.warning("%s: %d asked, only %d calibration blocks of %d tokens in the training split",
                    key, n, len(blocks), block_size)
    blocks = blocks.shuffle(seed=seed).select(range(min(n, len(blocks))))
    return torch.tensor(blocks["input_ids"], dtype=torch.long)
