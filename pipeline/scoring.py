"""The texts every model is scored on and the reference model it is compared with, shared by the quantize
gate and the evaluate stage so that both measure the same thing.

Texts: the validation split, the run's general English (`pipeline.general`), and any extra text files.
Reference: the run's fine-tuned model (its base model when fine-tuning is off): each model's KL divergence
from it and top-1 agreement with it, on the same windows as perplexity, tell models apart where perplexity
and task accuracy cannot (an int8 model can match perplexity and still disagree on many tokens)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline import data, formats, general, models
from pipeline.context import Context
from pipeline.metrics import score
from pipeline.records import read_record

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


def measure(model, texts: list[tuple[str, list[int], str]], context: int, stride: int, batch_size: int,
            reference: Reference, folder: Path | None = None) -> list[dict]:
    """Perplexity on each text and, against `reference`, KL divergence and top-1 agreement (one pass each);
    scoring the reference model itself keeps its log-probabilities instead of loading it again."""
    own = bool(reference) and folder is not None and reference.is_(folder)
    refs = reference.logprobs(texts) if reference and not own else {}
    out = []
    for name, ids, _ in texts:
        result, kept = score(model, ids, context, stride, None, batch_size, reference=refs.get(name),
                             keep=reference.tokens if own else 0)
        if own:
            reference.adopt(name, kept)
            result.update(kl=0.0, top1=1.0, kl_tokens=min(reference.tokens, result["scored_tokens"]))
        result["dataset"] = name
        out.append(result)
    return out
