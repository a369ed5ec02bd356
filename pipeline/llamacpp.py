"""llama.cpp as a client of GGUF folders, through `llama-cpp-python` (the optional `[llamacpp]` extra,
built from source: `make install-llamacpp`). Perplexity with the same sliding windows as the rest of the
pipeline, on token ids given by the caller (so llama.cpp and transformers score identical tokens), the
tokenization check, and prefill / greedy generation speed, all with llama.cpp's own kernels."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.metrics import windows

INSTALL = "pip install llama-cpp-python (builds llama.cpp from source; `make install-llamacpp`)"


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def uses_amx() -> bool:
    """Whether this llama.cpp build runs ggml's AMX backend here (a CPU with AMX and a build that has it)."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def load(path: str | Path, context: int, threads: int | None = None):
    """`llama_cpp.Llama` for a .gguf file, keeping the logits of every position (perplexity needs them).

    Where ggml's AMX backend is active, weights load without repacking (llama.cpp's `--no-repack`):
    its AMX repacked matmuls crash on quantized GGUF types on our Sapphire Rapids machines
    (ggml-org/llama.cpp#20824). `Llama` has no argument for it, so its model-defaults call is wrapped
    for the duration of the load."""
    import llama_cpp.llama_cpp as bindings
    from llama_cpp import Llama

    # llama-cpp-python generates on half the logical CPUs by default; torch uses every core it counts,
    # and speeds are set side by side, so both get the same number of threads.
    threads = threads or torch.get_num_threads()
    kwargs = dict(model_path=str(path), n_ctx=max(context, 64), n_batch=max(context, 64), logits_all=True,
                  n_threads=threads, n_threads_batch=threads, verbose=False)
    if not uses_amx():
        return Llama(**kwargs)
    defaults = bindings.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = no_repack
    try:
        return Llama(**kwargs)
    finally:
        bindings.llama_model_default_params = defaults


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's tokenization of plain text (no BOS, special-token text not parsed), to set against
    `tokenizer(text, add_special_tokens=False)`."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    top = rows.max(axis=-1, keepdims=True)
    return rows - top - np.log(np.exp(rows - top).sum(axis=-1, keepdims=True))


def perplexity(llm, ids: list[int], context: int, stride: int, max_tokens: int | None = None) -> dict:
    """Token-level perplexity of `ids` in llama.cpp: the windows of `pipeline.metrics.perplexity`, each
    evaluated from an empty KV cache, every token scored once."""
    ids = ids[:max_tokens] if max_tokens else ids
    nll, scored = 0.0, 0
    for begin, end, k in windows(len(ids), context, stride):
        window = ids[begin:end]
        llm.reset()
        llm.eval(window)
        logp = _log_softmax(np.asarray(llm.scores[: len(window) - 1]))
        targets = np.asarray(window[1:])
        token_lp = logp[np.arange(len(targets)), targets]
        nll -= float(token_lp[-k:].sum())
        scored += k
    return {"perplexity": math.exp(nll / scored), "nll": nll / scored, "scored_tokens": scored,
            "context": context, "stride": stride}


def prefill_ids(tokenizer, prompts: list[str], prefill_tokens: int) -> list[int]:
    """The prompts joined and repeated to `prefill_tokens` ids, as `pipeline.metrics.speed` builds them."""
    ids = tokenizer(" ".join(prompts))["input_ids"]
    return (ids * (prefill_tokens // len(ids) + 1))[:prefill_tokens]


def speed(llm, prefill: list[int], prompts: list[list[int]], new_tokens: int) -> dict:
    """What `pipeline.metrics.speed` measures for torch models, in llama.cpp: prefill tokens/s (one pass
    over `prefill`) and greedy generation tokens/s (`new_tokens` after each prompt, the prompt's own pass
    included), one timed run after a warm-up."""
    def time_prefill():
        llm.reset()
        started = time.perf_counter()
        llm.eval(prefill)
        return time.perf_counter() - started

    def time_generate(prompt):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - started

    time_prefill(), time_generate(prompts[0])  # warm-up
    prefill_s = time_prefill()
    generate_s = sum(time_generate(p) for p in prompts)
    return {"prefill_tok_s": round(len(prefill) / prefill_s, 1),
            "gen_tok_s": round(len(prompts) * new_tokens / generate_s, 2)}


def evaluate(path: str | Path, tokenizer, texts: list[tuple[str, list[int], str]], context: int, stride: int,
             prompts: list[str], prefill_tokens: int, new_tokens: int) -> dict:
    """llama.cpp's view of one GGUF file: perplexity per text on the caller's token ids, whether its own
    tokenizer splits a sample as the Hugging Face tokenizer does, and speed."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    prefill = prefill_ids(tokenizer, prompts, prefill_tokens)
    llm = load(path, max(context, len(prefill), max(len(p) for p in prompt_ids) + new_tokens))
    out = {"evaluations": [], "file": Path(path).name}
    for name, ids, _ in texts:
        out["evaluations"].append({"dataset": name, **perplexity(llm, ids, context, stride)})
    sample = tokenizer.decode(texts[0][1][:200])
    out["tokenization_matches"] = tokenize(llm, sample) == tokenizer(sample, add_special_tokens=False)["input_ids"]
    out.update(speed(llm, prefill, prompt_ids, new_tokens))
    import llama_cpp

    out["llama_cpp_python"] = llama_cpp.__version__
    out["weight_repacking"] = not uses_amx()
    return out
