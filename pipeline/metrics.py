"""Perplexity with a sliding window (as in the Hugging Face perplexity guide), batched; speed and memory."""
from __future__ import annotations

import gc
import math
import os
import statistics
import threading
import time

import torch


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: each window scores only the tokens the previous one did not,
    so every token is predicted once with up to `context - stride` tokens of left context."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        out.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


@torch.no_grad()
def perplexity(model, ids: list[int], context: int, stride: int, max_tokens: int | None = None,
               batch_size: int = 8) -> dict:
    """Token-level perplexity of `ids`; windows of equal length run `batch_size` at a time."""
    return score(model, ids, context, stride, max_tokens, batch_size)[0]


@torch.no_grad()
def score(model, ids: list[int], context: int, stride: int, max_tokens: int | None = None, batch_size: int = 8,
          reference: torch.Tensor | None = None, keep: int = 0) -> tuple[dict, torch.Tensor | None]:
    """Perplexity of `ids` and, in the same forward passes, how far the model's next-token distributions are
    from a reference model's: `reference` holds the reference's log-probabilities at the first scored positions
    (as `keep` returns them), and the result gains the mean KL(reference || model) in nats per token and the
    share of positions where both models' most likely token agree (what llama.cpp's `--kl-divergence`
    reports). `keep` > 0 also returns this model's own log-probabilities at its first `keep` scored positions,
    in float32 (rounding them to 16 bits would add noise of the size of an int8 model's KL).

    A window scores only its last `k` tokens, so the LM head and the log-softmax run on those positions
    alone: transformers' `logits_to_keep` makes the model apply its head to the last k + 1 hidden states
    (the last one predicts past the window and is dropped). Models without it (OpenVINO) give all logits."""
    import inspect

    import torch.nn.functional as F

    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("evaluation text has fewer than 2 tokens; use a larger validation split")
    stream = torch.tensor(ids, dtype=torch.long)
    device = model_device(model)
    spans = windows(len(stream), context, stride)
    slice_head = "logits_to_keep" in inspect.signature(model.forward).parameters
    nll, scored = 0.0, 0
    kl, agree, compared = 0.0, 0, 0
    # Rows are indexed by the position of the token predicted (row j: token j + 1), not by the order windows
    # run in, so a pass over a shorter stream (the reference's) lines up with a pass over the full one.
    limit = min(len(reference), len(stream) - 1) if reference is not None else 0
    keep = min(keep, len(stream) - 1)
    kept = None
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    groups: dict[tuple[int, int], list] = {}
    for span in spans:  # windows of one length and one scored count stack into a batch
        groups.setdefault((span[1] - span[0], span[2]), []).append(span)
    for (length, k), group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            batch = torch.stack([stream[b:e] for b, e, _ in chunk]).to(device)
            extra = {"logits_to_keep": k + 1} if slice_head else {}
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch), **extra).logits
            logits = torch.as_tensor(logits)[:, -(k + 1) : -1].float().flatten(0, 1)
            targets = batch[:, -k:].to(logits.device).flatten()
            nll += F.cross_entropy(logits, targets, reduction="sum").item()
            scored += len(targets)
            rows = torch.cat([torch.arange(e - k, e) for _, e, _ in chunk]) - 1  # row of each scored token
            wanted = rows < max(limit, keep)
            if not wanted.any():
                continue
            logp = F.log_softmax(logits[wanted.to(logits.device)], dim=-1).cpu()
            rows = rows[wanted]
            if keep:
                if kept is None:
                    kept = torch.zeros(keep, logp.shape[-1])
                sel = rows < keep
                kept[rows[sel]] = logp[sel]
            sel = rows < limit
            if sel.any():
                ref, mine = reference[rows[sel]], logp[sel]
                if ref.shape[-1] != mine.shape[-1]:  # a vocabulary padded differently: compare the shared ids
                    v = min(ref.shape[-1], mine.shape[-1])
                    ref, mine = ref[:, :v], mine[:, :v]
                kl += F.kl_div(mine, ref, log_target=True, reduction="sum").item()
                agree += (mine.argmax(-1) == ref.argmax(-1)).sum().item()
                compared += len(ref)
    if was_training:
        model.train()
    result = {
        "perplexity": math.exp(nll / scored),
        "nll": nll / scored,
        "scored_tokens": scored,
        "context": context,
        "stride": stride,
    }
    if compared:
        result.update(kl=kl / compared, top1=agree / compared, kl_tokens=compared)
    return result, kept


@torch.no_grad()
def guide_perplexity(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop (one window at a time, loss from `labels`): the reference
    that tests and bench/evaluate.py compare `perplexity` against. The guide weights each window's mean
    loss by `valid - 1`; here the labels that survive the model's internal shift are counted exactly."""
    enc = torch.tensor([ids], device=model_device(model))
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, enc.size(1), stride):
        end = min(begin + context, enc.size(1))
        input_ids = enc[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, : -(end - prev_end)] = -100
        loss = model(input_ids, labels=target_ids).loss
        valid = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == enc.size(1):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def repetition(texts: list[str], n: int = 4) -> float | None:
    """Share of the word n-grams in `texts` that repeat an earlier n-gram of the same text: 0 for varied
    text, towards 1 for a model stuck in a loop ("is a function that is a function that ...")."""
    total = repeated = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return round(repeated / total, 4) if total else None


def word_perplexity(token_result: dict, text: str) -> float:
    """Word-level perplexity: the same total NLL spread over whitespace-separated words of the scored text."""
    words = len(text.split())
    return math.exp(token_result["nll"] * token_result["scored_tokens"] / max(words, 1))


class PeakMemory:
    """Peak memory the block adds: CUDA allocator peak, or on CPU the rise of process RSS over what the
    process held when the block started. On Linux the kernel's high-water mark (VmHWM, reset through
    /proc/self/clear_refs) catches short spikes exactly; elsewhere RSS is sampled every 20 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    def _rss_mb(self) -> float:
        try:
            with open(f"/proc/{os.getpid()}/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    @staticmethod
    def _hwm_mb() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()  # drop the previous model before taking the baseline
            self.start_mb = self.peak_mb = self._rss_mb()
            self._hwm = self._reset_hwm()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._rss_mb(), self._hwm_mb() if self._hwm else 0.0) - self.start_mb


NOISY_SPREAD = 0.15  # (slowest - fastest) / median of the timed runs above which a speed is not trusted
BUSY_LOAD = 1.5  # 1-minute load average per core above which other work shares the machine (this run alone: ~1)
MORE_RUNS = 3  # an unstable timing is repeated up to this many times `repeats` runs before it is flagged


def machine_load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every OS
        return None


def _median_seconds(fn, repeats: int) -> tuple[float, dict]:
    """Median seconds of `fn` after a warm-up, and how far to trust it: runs are repeated (up to MORE_RUNS x
    `repeats`) until the last `repeats` agree within NOISY_SPREAD; the machine's load is read before and after.
    `noisy` when they never agreed or other work loaded the machine."""
    load = [machine_load()]
    fn()  # warm-up: first calls pay for allocation, kernel selection and caches
    times: list[float] = []
    while True:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        recent = times[-repeats:]
        spread = (max(recent) - min(recent)) / statistics.median(recent) if len(recent) > 1 else 0.0
        if len(times) >= repeats and (spread <= NOISY_SPREAD or len(times) >= MORE_RUNS * repeats):
            break
    load.append(machine_load())
    cores = os.cpu_count() or 1
    peak = max((x for x in load if x is not None), default=None)
    busy = peak is not None and peak > BUSY_LOAD * cores
    return statistics.median(recent), {"runs": len(times), "spread": round(spread, 3), "load": peak, "cores": cores,
                                       "noisy": spread > NOISY_SPREAD or busy}


def prefill_ids(tokenizer, prompts: list[str], prefill_tokens: int, device) -> torch.Tensor:
    """The speed measurement's prompt: the prompts joined and repeated to exactly `prefill_tokens` tokens."""
    prompt_ids = tokenizer(" ".join(prompts), return_tensors="pt")["input_ids"]
    return prompt_ids.repeat(1, prefill_tokens // prompt_ids.shape[1] + 1)[:, :prefill_tokens].to(device)


def greedy(model, tokenizer, encoded, new_tokens: int):
    """Exactly `new_tokens` greedy tokens after one tokenized prompt (the speed measurement's generation)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=pad)


@torch.no_grad()
def speed(model, tokenizer, prompts: list[str], prefill_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Prefill tokens/s (one forward pass over `prefill_tokens`) and greedy generate tokens/s
    (exactly `new_tokens` new tokens per prompt), median of `repeats` after a warm-up."""
    device = model_device(model)
    ids = prefill_ids(tokenizer, prompts, prefill_tokens, device)
    prefill_s, prefill_noise = _median_seconds(lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids)),
                                               repeats)
    encoded = [tokenizer(p, return_tensors="pt").to(device) for p in prompts]

    def gen():
        for enc in encoded:
            greedy(model, tokenizer, enc, new_tokens)

    gen_s, gen_noise = _median_seconds(gen, repeats)
    return {
        "prefill_tok_s": round(ids.shape[1] / prefill_s, 1),
        "gen_tok_s": round(new_tokens * len(prompts) / gen_s, 2),
        # a number taken while other work ran, or whose runs never agreed, is marked so wherever it is shown
        "speed_noisy": prefill_noise["noisy"] or gen_noise["noisy"],
        "speed_noise": {"prefill": prefill_noise, "generate": gen_noise},
        "speed_settings": {"prefill_tokens": int(ids.shape[1]), "new_tokens": new_tokens,
                           "prompts": len(prompts), "repeats": repeats, "device": str(device)},
    }
