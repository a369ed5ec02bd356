"""The texts every model is scored on and the reference model it is compared with, shared by the quantize
gate and the evaluate stage so that both measure the same thing.

Texts: the validation split, the run's general English (`pipeline.general`), and any extra text files.
Reference: the run's fine-tuned model (its base model when fine-tuning is off): each model's KL divergence
from it and top-1 agreement with it, on the same windows as perplexity, tell models apart where perplexity
and task accuracy cannot (an int8 model can match perplexity and still disagree on many tokens)."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from pipeline import data, formats, general, models
from pipeline.context import Context
from pipeline.metrics import model_device, score
from pipeline.records import fingerprint, read_record

log = logging.getLogger("pipeline")


def texts(ctx: Context, tokenizer, max_tokens: int | None, extra: list[str] = (),
          keep_text: bool = False) -> list[tuple[str, list[int], str]]:
    """(name, token ids, text) for the validation split, the general text (when the run has one) and each extra
    `.txt` file; ids cut to `max_tokens`; the text only where `keep_text` (word-level perplexity needs it)."""
    tokenized = data.prepare(ctx.data, tokenizer, ctx.seed)
    ids = data.eval_stream(tokenized["validation"])[: max_tokens or None]
    out = [(ctx.data.label, ids, tokenizer.decode(ids) if keep_text else "")]
    named = [(general.LABEL, general.text(ctx.general, ctx.run_dir, ctx.seed))]
    named += [(Path(p).name, Path(p).expanduser().read_text()) for p in extra]
    for name, text in named:
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][: max_tokens or None]
        out.append((name, ids, tokenizer.decode(ids) if keep_text else ""))
    return out


class Reference:
    """The reference model's next-token log-probabilities at the first `tokens` scored positions of each text,
    computed on first use (one load of the reference model) and kept for every model compared with it."""

    def __init__(self, folder: Path | None, tokens: int, context: int, stride: int, batch_size: int):
        self.folder, self.tokens = folder, tokens
        self.window = (context, stride)
        self.batch_size = batch_size
        self._logprobs: dict[str, torch.Tensor] = {}
        record = read_record(folder) if folder is not None else None
        self.fingerprint = record.fingerprint if record is not None and tokens else None

    def __bool__(self) -> bool:
        return self.fingerprint is not None

    def is_(self, folder: Path) -> bool:
        """Whether `folder` is the reference model's (its own pass can keep the log-probabilities)."""
        return self.folder is not None and Path(folder).resolve() == Path(self.folder).resolve()

    def logprobs(self, texts: list[tuple[str, list[int], str]]) -> dict[str, torch.Tensor]:
        missing = [t for t in texts if t[0] not in self._logprobs]
        if self and missing:
            log.info("scoring: reference %s on %d tokens of %s", self.folder.name, self.tokens,
                     ", ".join(t[0] for t in missing))
            model, _ = formats.load_folder(self.folder, device_map=str(models.pick_device()))
            context, stride = self.window
            for name, ids, _ in missing:  # the windows up to `tokens`: each position's left context as in a full pass
                self._logprobs[name] = score(model, ids, context, stride, self.tokens + context,
                                             self.batch_size, keep=self.tokens)[1]
            del model
        return self._logprobs

    def adopt(self, name: str, logprobs: torch.Tensor | None) -> None:
        """Keep the reference's log-probabilities from a pass that scored the reference model anyway."""
        if logprobs is not None:
            self._logprobs.setdefault(name, logprobs)


class Measurements:
    """Measurements taken in this run, kept in runs/<name>/measurements.json and keyed by everything that decides
    them: the folder's record fingerprint (its weights and how they were made), the token ids, the windows, the
    reference it was compared with and the device. The quantize gate's scores of its inputs and of the shipped
    candidate are then what evaluate reports, without a second pass; `--force` measures again."""

    FILE = "measurements.json"

    def __init__(self, run_dir: Path, force: bool = False):
        self.path = Path(run_dir) / self.FILE
        self.force = force
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def key(folder_fp: str, stamps: list, ids: list[int], context: int, stride: int, reference: Reference,
            device: str) -> str:
        digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
        # the weight files' stamps too: a stage forced to run again writes new weights under the same fingerprint;
        # batch size is left out: windows batched differently give the same sums to float rounding
        return fingerprint("measurement", folder_fp, stamps, digest, context, stride,
                           reference.fingerprint if reference else None, reference.tokens if reference else 0,
                           device.split(":")[0])

    def get(self, key: str) -> dict | None:
        return None if self.force else self.entries.get(key)

    def put(self, key: str, result: dict) -> None:
        self.entries[key] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries))
        tmp.replace(self.path)

    def remember(self, folder_fp: str, folder: Path, texts, context: int, stride: int, reference: Reference,
                 device: str, evaluations: list[dict]) -> None:
        """Keep measurements taken of a folder before it got its final record and place (the shipped quantize
        candidate, moved into the stage folder)."""
        stamps = formats.weight_stamps(folder)
        for (_, ids, _), result in zip(texts, evaluations):
            self.put(self.key(folder_fp, stamps, ids, context, stride, reference, device), result)


def measure(model, texts: list[tuple[str, list[int], str]], context: int, stride: int, batch_size: int,
            reference: Reference, folder: Path | None = None, store: Measurements | None = None,
            stage: str = "") -> list[dict]:
    """Perplexity on each text and, against `reference`, KL divergence and top-1 agreement (one pass each);
    scoring the reference model itself keeps its log-probabilities instead of loading it again. With a `store`,
    a text this folder was already measured on is not scored again (`measured_in` says by which stage)."""
    own = bool(reference) and folder is not None and reference.is_(folder)
    record = read_record(folder) if store is not None and folder is not None else None
    stamps = formats.weight_stamps(folder) if record else None
    device = str(model_device(model))
    out = []
    for name, ids, _ in texts:
        key = store.key(record.fingerprint, stamps, ids, context, stride, reference, device) if record else None
        result = store.get(key) if key else None
        if result is None:
            refs = reference.logprobs(texts) if reference and not own else {}
            result, kept = score(model, ids, context, stride, None, batch_size, reference=refs.get(name),
                                 keep=reference.tokens if own else 0)
            if own:
                reference.adopt(name, kept)
                result.update(kl=0.0, top1=1.0, kl_tokens=min(reference.tokens, result["scored_tokens"]))
            result["measured_in"] = stage
            if key:
                store.put(key, result)
        out.append({**result, "dataset": name})
    return out
