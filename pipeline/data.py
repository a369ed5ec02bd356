"""Text data: Hub datasets, local files or the stdlib corpus → deterministic split → packed blocks.
Chat data (`format: chat`) is rendered with a chat template and tokenized by `pipeline.chat`."""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from pipeline.config import StageError

log = logging.getLogger("pipeline")

LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


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
    source: str = "stdlib"  # "stdlib", a Hub dataset name, or a local .txt/.jsonl/.csv/.parquet file
    config: str | None = None  # Hub dataset configuration, e.g. wikitext-2-raw-v1
    split: str = "train"  # split to train on
    validation_split: str | None = None  # use this split for validation instead of carving one out
    validation_percent: float = 10.0  # % of documents held out for validation when no split is named
    text_column: str = "text"
    block_size: int = 256  # tokens per packed training block (chat: longest example, longer ones are cut)
    max_train_blocks: int | None = None  # cap on training blocks (chat: examples), for quick runs
    format: Literal["text", "chat"] = "text"  # chat: conversations, loss on the assistant's tokens only
    messages_column: str = "messages"  # chat: list of {role, content} ...
    prompt_column: str = "prompt"  # ... or a prompt and a response column
    response_column: str = "response"
    chat_template: str | None = None  # chat: Jinja template; null = the tokenizer's own
    mix: list[MixSource] = field(default_factory=list)  # more text sources sampled into the training blocks

    def check(self) -> list[str]:
        problems = []
        if not 0 < self.validation_percent < 100:
            problems.append(f"validation_percent: {self.validation_percent} must be between 0 and 100")
        if self.block_size < 8:
            problems.append(f"block_size: {self.block_size} is too small; use at least 8")
        if self.source != "stdlib":
            path = Path(self.source).expanduser()
            looks_local = path.suffix in LOCAL_FORMATS or self.source.startswith((".", "/", "~"))
            if looks_local and not path.is_file():
                problems.append(f"source: file '{self.source}' does not exist")
            elif path.suffix and looks_local and path.suffix not in LOCAL_FORMATS:
                problems.append(f"source: unsupported file type '{path.suffix}'; use one of {', '.join(LOCAL_FORMATS)}")
        if self.mix and self.format == "chat":
            problems.append("mix: mixing sources works for text data only; remove mix or use format: text")
        return problems

    @property
    def label(self) -> str:
        """Dataset name for model cards."""
        if self.source == "stdlib":
            return "python-stdlib-pydoc-topics"
        return self.source if not Path(self.source).suffix else Path(self.source).name


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


def load_splits(cfg: DataConfig, seed: int):
    """Return a DatasetDict with `train` and `validation` splits of raw documents."""
    import datasets

    if cfg.source == "stdlib":
        ds = datasets.load_dataset("json", data_files=str(stdlib_corpus_file()), split="train")
    elif Path(cfg.source).suffix in LOCAL_FORMATS:
        builder = LOCAL_FORMATS[Path(cfg.source).suffix]
        ds = datasets.load_dataset(builder, data_files=str(Path(cfg.source).expanduser()), split="train")
    else:
        try:
            ds = datasets.load_dataset(cfg.source, cfg.config, split=cfg.split)
            if cfg.validation_split:
                val = datasets.load_dataset(cfg.source, cfg.config, split=cfg.validation_split)
                return _checked(datasets.DatasetDict(train=ds, validation=val), cfg)
        except Exception as err:  # datasets raises many types; the user needs one message
            raise StageError(
                f"data.source: could not load Hub dataset '{cfg.source}' (config {cfg.config!r}, split "
                f"{cfg.split!r}): {err}. Offline? use a local file or data.source=stdlib"
            ) from err
    parts = ds.train_test_split(test_size=cfg.validation_percent / 100, seed=seed, shuffle=True)
    return _checked(datasets.DatasetDict(train=parts["train"], validation=parts["test"]), cfg)


def _checked(dsd, cfg: DataConfig):
    if cfg.format == "chat":
        from pipeline import chat

        return chat.check_columns(dsd, cfg)
    for name, split in dsd.items():
        if cfg.text_column not in split.column_names:
            raise StageError(
                f"data.text_column: column '{cfg.text_column}' not in the {name} split of '{cfg.source}'; "
                f"columns are: {', '.join(split.column_names)}"
            )
    return dsd


def tokenize(dsd, tokenizer, cfg: DataConfig):
    """Tokenize documents, appending EOS so packed documents stay separated (cached by `datasets`).
    Chat data gets `labels` too: the token ids of the assistant's turns, -100 elsewhere."""
    if cfg.format == "chat":
        from pipeline import chat

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
        if len(sets[name]) == 0:
            raise StageError(f"{stage}: the {name} split of '{cfg.source}' has no complete {unit} of "
                             f"data.block_size {cfg.block_size} tokens; use more data or a smaller data.block_size")


def cap_train(dsd, limit: int | None):
    """At most `limit` rows of the train split (a DatasetDict) or of a single Dataset."""
    if limit is None:
        return dsd
    if hasattr(dsd, "keys"):
        if len(dsd["train"]) > limit:
            dsd["train"] = dsd["train"].select(range(limit))
        return dsd
    return dsd.select(range(limit)) if len(dsd) > limit else dsd


def eval_stream(tokenized_validation) -> list[int]:
    """The validation documents as one token stream, for sliding-window perplexity."""
    return [t for ids in tokenized_validation["input_ids"] for t in ids]


def prepare(cfg: DataConfig, tokenizer, seed: int):
    """Raw splits → tokenized splits; the caller packs or streams them."""
    return tokenize(load_splits(cfg, seed), tokenizer, cfg)


def calibration_blocks(cfg: DataConfig, tokenizer, seed: int, n: int, key: str,
                       block_size: int | None = None) -> "torch.Tensor":
    """n blocks of `block_size` (default data.block_size) tokens drawn (seeded) from the training split:
    never the validation split, which the evaluate stage and the quantize gate score. `key` is the recipe
    key that asked for them, named in messages."""
    import torch

    block_size = block_size or cfg.block_size
    tokenized = prepare(cfg, tokenizer, seed)["train"].select_columns(["input_ids"])
    blocks = pack(tokenized, block_size)
    if len(blocks) == 0:
        raise StageError(f"{key}: the training split of '{cfg.source}' has no block of {block_size} tokens to "
                         "calibrate on; use more data or smaller blocks")
    if len(blocks) < n:
        log.warning("%s: %d asked, only %d calibration blocks of %d tokens in the training split",
                    key, n, len(blocks), block_size)
    blocks = blocks.shuffle(seed=seed).select(range(min(n, len(blocks))))
    return torch.tensor(blocks["input_ids"], dtype=torch.long)
