"""General English that every run has, offline, without copying anyone's prose: text the run's base model writes
itself from short general prompts (sampled, seeded). A model scored on it shows what the chain forgot outside
the recipe's domain; its KL divergence from the base on the base's own text measures that forgetting directly.
It is written once per base model under the run folder and never enters training or calibration data (the
stages that train read `data` only)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from pipeline import errors, models
from pipeline.data import MixSource
from pipeline.errors import StageError
from pipeline.records import fingerprint, read_record

log = logging.getLogger("pipeline")

# Openings of everyday prose on many subjects (written for this project); the base model continues each one.
PROMPTS = [
    "The village sat at the edge of a wide river, and every morning",
    "When the train finally arrived at the station,",
    "My grandmother always said that the secret to good bread",
    "The history of the city begins in the twelfth century, when",
    "Scientists studying the migration of birds have found that",
    "The new library opened last spring. Its reading rooms",
    "After the storm had passed, the fishermen",
    "In most countries, children start school at the age of",
    "The painting shows a woman standing by a window,",
    "Farmers in the valley grow wheat, barley and",
    "She opened the letter slowly and read the first line:",
    "The football match was delayed for an hour because",
    "A healthy breakfast usually includes",
    "The mountain road was narrow and steep, and the driver",
    "During the summer holidays, the family travelled to",
    "The museum's collection includes more than",
    "He had never seen the sea before. When they reached the beach,",
    "The committee met on Tuesday to discuss",
    "Rain fell on the roofs of the old town while",
    "The recipe calls for two cups of flour,",
    "Most people who visit the island come for",
    "The election results surprised many observers, who had expected",
    "Our neighbours have a small garden where they",
    "The ship left the harbour at dawn, carrying",
]


@dataclass
class GeneralConfig:
    # tokens of general English the base model writes (sampled from `prompts`) for every report and the quantize
    # gate to score each model on besides the validation split; 0 = none
    tokens: int = 2048
    # openings it continues (null = two dozen everyday openings built in); each gets an equal share of `tokens`
    prompts: list[str] | None = None
    top_p: float = 0.95  # nucleus sampling: the base's own distribution without its least likely tail
    batch_size: int = 8  # prompts continued per generate call

    def check(self) -> list[str]:
        return _sampling_problems(self, "the built-in ones")


def _sampling_problems(cfg, null_prompts: str) -> list[str]:
    """The problems of the settings a model-written text shares (GeneralConfig, OwnText): tokens, prompts, top_p,
    batch_size. `null_prompts`: what `prompts: null` means there."""
    problems = [] if cfg.tokens >= 0 else [f"tokens: {cfg.tokens} must be 0 (none) or more"]
    if cfg.prompts is not None and not [p for p in cfg.prompts if isinstance(p, str) and p.strip()]:
        problems.append(f"prompts: give at least one non-empty opening, or null for {null_prompts}")
    if not 0 < cfg.top_p <= 1:
        problems.append(f"top_p: {cfg.top_p} must be in (0, 1]")
    if cfg.batch_size < 1:
        problems.append(f"batch_size: {cfg.batch_size} must be at least 1")
    return problems


LABEL = "general (base samples)"  # the dataset name in reports


def text(cfg: GeneralConfig, run_dir: Path, seed: int) -> str | None:
    """The run's general text: read from run_dir/general/ when the base model and settings are unchanged, else
    written by the base model now. None when turned off or when the run has no base folder yet."""
    base = run_dir / "base"
    record = read_record(base) if base.is_dir() else None
    if not cfg.tokens or record is None:
        return None
    prompts = [p for p in (cfg.prompts or PROMPTS) if p.strip()]
    fp = fingerprint("general", record.fingerprint, cfg.tokens, prompts, cfg.top_p, seed)

    def write() -> str:
        from pipeline import formats

        log.info("general: the base model writes %d tokens of general English from %d openings (never trained "
                 "on)", cfg.tokens, len(prompts))
        model, tokenizer = formats.load_folder(base, device_map=str(models.pick_device()))
        return sample(model, tokenizer, prompts, -(-cfg.tokens // len(prompts)), cfg.top_p, seed, cfg.batch_size)

    meta = {"tokens": cfg.tokens, "prompts": len(prompts), "top_p": cfg.top_p, "seed": seed, "written_by": str(base)}
    return cached(run_dir / "general" / "general.txt", fp, meta, write).read_text()


def cached(path: Path, fp: str, meta: dict, write: Callable[[], str]) -> Path:
    """`path`, kept while its sidecar `<name>.json` holds fingerprint `fp`; else written anew from `write()`
    (atomically, so an interrupted run never leaves half a text to be read back as whole)."""
    side = path.with_suffix(".json")
    try:
        if json.loads(side.read_text()).get("fingerprint") == fp and path.is_file():
            return path
    except (OSError, ValueError):
        pass
    # as reading the file back will give it (universal newlines): every reader must see the same text
    body = write().replace("\r\n", "\n").replace("\r", "\n")
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(body)
        tmp.replace(path)
        side.write_text(json.dumps({"fingerprint": fp, **meta}, indent=2))
    except OSError as err:
        tmp.unlink(missing_ok=True)
        side.unlink(missing_ok=True)  # a text without its fingerprint is written again next time
        if errors.is_disk_full(err):
            raise errors.disk_full(path, 0, len(body.encode()) + 4096, what=path.name, cleanup="") from err
        raise
    return path


def sample(model, tokenizer, prompts: list[str], new_tokens: int, top_p: float, seed: int, batch_size: int) -> str:
    """Each prompt and its sampled continuation, one paragraph each."""
    texts = continuations(model, tokenizer, prompts, new_tokens, top_p, seed, batch_size)
    return "\n\n".join(f"{p} {t.strip()}" for p, t in zip(prompts, texts)) + "\n"


def start_token(tokenizer) -> int | None:
    """The id a document starts from in the model's training (BOS, else the end-of-text token that GPT-2-style
    models put between documents); None when the tokenizer has neither."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def continuations(model, tokenizer, prompts: list[str | None], new_tokens: int, top_p: float, seed: int,
                  batch_size: int) -> list[str]:
    """The model's sampled continuation of each prompt (None: of the start token alone, the model's own picture
    of a document), decoded without special tokens. Left padding, so a batch generates alike. Seeded with `seed`
    on a fork of the random state: the caller's own random stream (a stage's training) is as it would be without
    this text, whether it was written now or read back."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _continuations(model, tokenizer, prompts, new_tokens, top_p, batch_size)


def _continuations(model, tokenizer, prompts, new_tokens, top_p, batch_size) -> list[str]:
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.pad_token_id is None:  # batched prompts need one; the tokenizer is this function's own copy
        tokenizer.pad_token_id = pad
    device = getattr(model, "device", "cpu")
    out_texts = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            if all(p is None for p in chunk):
                ids = torch.full((len(chunk), 1), start_token(tokenizer), dtype=torch.long)
                enc = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
            else:
                enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                 top_p=top_p, top_k=0, temperature=1.0, pad_token_id=pad)
            out_texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out_texts


@dataclass
class OwnText:
    # tokens of text the model writes itself, sampled from its start token (its own picture of a document, no
    # prompt), added to the stage's text as one more `mix` source: importance (prune) or KD (distill) then also
    # covers what the recipe's text does not, so the cut keeps more of the model's general English. Written once
    # per model and settings under <run>/own-text/; never the general text the reports score. 0 = none
    tokens: int = 0
    weight: float = 1.0  # its share of the blocks, relative to the stage's text's weight of 1
    prompts: list[str] | None = None  # openings the model continues instead (null = its start token alone)
    length: int = 128  # tokens per written sequence
    top_p: float = 0.95  # nucleus sampling: the model's own distribution without its least likely tail
    batch_size: int = 32  # sequences written per generate call

    def check(self) -> list[str]:
        problems = _sampling_problems(self, "the start token alone")
        if self.weight <= 0:
            problems.append(f"weight: {self.weight} must be positive")
        if self.length < 1:
            problems.append(f"length: {self.length} must be at least 1")
        return problems


def with_own_text(text, cfg: OwnText, model, tokenizer, folder: Path, run_dir: Path, seed: int):
    """`text` (a DataConfig) with the text `model` (read from `folder`) writes itself as one more mix source;
    `text` itself when `cfg.tokens` is 0."""
    if not cfg.tokens:
        return text
    path = own_text(cfg, model, tokenizer, folder, run_dir, seed)
    return replace(text, mix=[*text.mix, MixSource(source=str(path), weight=cfg.weight)])


def own_text(cfg: OwnText, model, tokenizer, folder: Path, run_dir: Path, seed: int) -> Path:
    """<run>/own-text/own-text-<fingerprint>.jsonl: `cfg.tokens` tokens `model` writes, one document per written sequence;
    kept while the model (its folder's record) and these settings are unchanged, so that a resumed run, and the
    prune and distill stages of one run that ask for the same text of the same model, write it once."""
    prompts = [p for p in cfg.prompts if p.strip()] if cfg.prompts else None
    if prompts is None and start_token(tokenizer) is None:
        raise StageError("own_text: the model's tokenizer has neither a BOS nor an EOS token to start its text "
                         "from; give own_text.prompts (openings to continue)")
    record = read_record(folder)
    count = -(-cfg.tokens // cfg.length)
    fp = fingerprint("own-text", record.fingerprint if record else str(folder.resolve()), cfg.tokens, prompts,
                     cfg.length, cfg.top_p, seed)
    openings = [prompts[i % len(prompts)] for i in range(count)] if prompts else [None] * count

    def write() -> str:
        log.info("own text: %s writes %d tokens of its own text (%d sequences of %d)", folder, count * cfg.length,
                 count, cfg.length)
        model.to(models.pick_device())  # where its stage runs it anyway
        texts = continuations(model, tokenizer, openings, cfg.length, cfg.top_p, seed, cfg.batch_size)
        return "".join(json.dumps({"text": (f"{o} " if o else "") + t.strip()}) + "\n"
                       for o, t in zip(openings, texts))

    meta = {"tokens": cfg.tokens, "sequences": count, "length": cfg.length, "prompts": prompts, "top_p": cfg.top_p,
            "seed": seed, "written_by": str(folder)}
    return cached(run_dir / "own-text" / f"own-text-{fp}.jsonl", fp, meta, write)
