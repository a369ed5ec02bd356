"""General English that every run has, offline, without copying anyone's prose: text the run's base model writes
itself from short general prompts (sampled, seeded). A model scored on it shows what the chain forgot outside
the recipe's domain; its KL divergence from the base on the base's own text measures that forgetting directly.
It is written once per base model under the run folder and never enters training or calibration data (the
stages that train read `data` only)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

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
        problems = []
        if self.tokens < 0:
            problems.append(f"tokens: {self.tokens} must be 0 (none) or more")
        if self.prompts is not None and not [p for p in self.prompts if isinstance(p, str) and p.strip()]:
            problems.append("prompts: give at least one non-empty opening, or null for the built-in ones")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: {self.top_p} must be in (0, 1]")
        if self.batch_size < 1:
            problems.append(f"batch_size: {self.batch_size} must be at least 1")
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
    folder = run_dir / "general"
    meta = folder / "general.json"
    try:
        if json.loads(meta.read_text()).get("fingerprint") == fp:
            return (folder / "general.txt").read_text()
    except (OSError, ValueError):
        pass
    from pipeline import formats, models

    log.info("general: the base model writes %d tokens of general English from %d openings (never trained on)",
             cfg.tokens, len(prompts))
    model, tokenizer = formats.load_folder(base, device_map=str(models.pick_device()))
    body = sample(model, tokenizer, prompts, -(-cfg.tokens // len(prompts)), cfg.top_p, seed, cfg.batch_size)
    # as reading the file back will give it (universal newlines): every stage must score the same text
    body = body.replace("\r\n", "\n").replace("\r", "\n")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "general.txt.tmp"
    tmp.write_text(body)
    tmp.replace(folder / "general.txt")
    meta.write_text(json.dumps({"fingerprint": fp, "tokens": cfg.tokens, "prompts": len(prompts),
                                "top_p": cfg.top_p, "seed": seed, "written_by": str(base)}, indent=2))
    return body


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], new_tokens: int, top_p: float, seed: int, batch_size: int) -> str:
    """Each prompt and its sampled continuation, one paragraph each (left padding, so a batch generates alike)."""
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.pad_token_id is None:  # batched prompts need one; the tokenizer is this function's own copy
        tokenizer.pad_token_id = pad
    paragraphs = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(getattr(model, "device", "cpu"))
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                 top_p=top_p, top_k=0, temperature=1.0, pad_token_id=pad)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            paragraphs += [f"{p} {t.strip()}" for p, t in zip(chunk, texts)]
    finally:
        tokenizer.padding_side = side
    return "\n\n".join(paragraphs) + "\n"
