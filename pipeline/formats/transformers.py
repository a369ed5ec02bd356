"""The transformers folder: safetensors weights, config.json and the tokenizer, as `save_pretrained` writes
them; `AutoModelForCausalLM.from_pretrained` reloads it. The `bnb-*` candidates write this format too, with
bitsandbytes weights and the `quantization_config` in config.json; a LoRA adapter folder is one as well
(`AutoPeftModelForCausalLM`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline import models

NAME = "transformers"
BACKEND = "bitsandbytes"  # the quantization library of this format's candidates
PACKAGES = ["bitsandbytes"]
RUNTIME = ("transformers",)  # imported before a folder's peak memory is measured (pipeline/memprobe.py)
METHODS = {"bnb-int8": 8, "bnb-nf4": 4, "bnb-fp4": 4}  # candidate method -> bits of the main weight type
OPTIONS = {  # candidate option -> the methods it applies to
    "threshold": ("bnb-int8",),
    "double_quant": ("bnb-nf4", "bnb-fp4"),
    "compute_dtype": ("bnb-nf4", "bnb-fp4"),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def holds(folder: Path) -> bool:
    return (Path(folder) / "config.json").is_file()


def load(folder: Path, **kwargs):
    source = models.Source("folder", str(folder))
    return models.load_model(source, **kwargs), models.load_tokenizer(source)


def weight_files(folder: Path) -> list[Path]:
    """What a user loads to run it; a LoRA `adapter/` beside merged weights is not counted."""
    return [p for p in Path(folder).glob("*") if p.suffix in WEIGHT_SUFFIXES]


def usage(folder: Path, ref: str) -> str:
    """A loading snippet for the folder, naming `ref` as the model."""
    if (folder / "adapter_config.json").is_file():
        return ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f'model = AutoPeftModelForCausalLM.from_pretrained("{ref}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{ref}")')
    try:
        quant = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        quant = {}
    note = ""
    if quant.get("quant_method") == "bitsandbytes":
        note = "# needs `pip install bitsandbytes`; the quantization config is read from config.json\n"
    return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n" + note
            + f'model = AutoModelForCausalLM.from_pretrained("{ref}"'
            + (', device_map="auto")\n' if note else ")\n")
            + f'tokenizer = AutoTokenizer.from_pretrained("{ref}")')


def card_section(folder: Path, repo_id: str | None) -> str:
    return ""


def lm_eval_model(model, tokenizer, folder: Path, batch_size: int):
    """lm-eval's HFLM around the loaded torch model (full precision or bitsandbytes), scoring continuations with
    the output head at their own positions only (see `_scored_positions_lm`)."""
    return _scored_positions_lm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _scored_positions_lm():
    """HFLM whose log-likelihoods run the output head and the softmax only where a continuation is scored, as
    the perplexity pass does (`logits_to_keep`). HFLM computes them at every position of every request: with a
    262K-token vocabulary and short multiple-choice continuations that is most of a task's time. Requests are
    left-padded, so every row's continuation ends at the last position, with explicit position ids so padding
    changes nothing; results equal HFLM's (tests/test_tasks.py)."""
    from lm_eval.models.huggingface import HFLM

    class ScoredPositionsLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            size = int(override_bs or self.batch_size)
            # longest first, so a batch pads little; answered in the caller's order
            order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
            results: list = [None] * len(requests)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            for start in range(0, len(order), size):
                batch = order[start:start + size]
                seqs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in batch]
                conts = [requests[i][2] for i in batch]
                width, keep = max(map(len, seqs)), max(map(len, conts))
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, seq in enumerate(seqs):
                    ids[row, width - len(seq):] = torch.tensor(seq)
                    mask[row, width - len(seq):] = 1
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                with torch.no_grad():
                    logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                        position_ids=positions.to(self.device), logits_to_keep=keep).logits
                logprobs = torch.nn.functional.log_softmax(logits.float(), dim=-1).cpu()
                for row, i in enumerate(batch):
                    cont = torch.tensor(conts[row])
                    scored = logprobs[row, keep - len(cont):]
                    results[i] = (float(scored.gather(-1, cont[:, None]).sum()),
                                  bool((scored.argmax(-1) == cont).all()))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            return results

    return ScoredPositionsLM


# --- quantize candidates (bitsandbytes) ------------------------------------------------------------------

def unavailable(cand, device: torch.device) -> str | None:
    if device.type == "mps":
        return "bitsandbytes does not run on Apple MPS; use an openvino-* candidate, or run on CPU/CUDA"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "needs bitsandbytes: pip install bitsandbytes"
    return None


def unsupported(config) -> str | None:
    """Why a model with this config cannot be written in this format, or None if it can."""
    return None


def check(cand) -> list[str]:
    return []


def bnb_config(cand):
    from transformers import BitsAndBytesConfig

    if cand.method == "bnb-int8":
        threshold = 6.0 if cand.threshold is None else cand.threshold
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cand.method.removeprefix("bnb-"),
        bnb_4bit_use_double_quant=True if cand.double_quant is None else cand.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cand.compute_dtype or "float32"),
    )


def convert(cand, job):
    """The input folder loaded with bitsandbytes quantizing its weights (in memory, not yet saved); `job` is
    the quantize stage's `quant_backends.Job`."""
    return models.load_model(models.Source("folder", str(job.source)), trust_remote_code=job.trust_remote_code,
                             quantization_config=bnb_config(cand), device_map=str(job.device))


def save(model, folder: Path, tokenizer=None) -> None:
    """Safetensors + config.json with quantization_config, and the tokenizer. Save before running the model: on
    CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on the first forward pass (scales rounded to bf16)
    and saving unpacks them again, which is not exact."""
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def describe(cand) -> str:
    if cand.method == "bnb-int8":
        return f"bitsandbytes LLM.int8 weights (outlier threshold {bnb_config(cand).llm_int8_threshold})"
    q = bnb_config(cand)
    return (f"bitsandbytes 4-bit {q.bnb_4bit_quant_type.upper()} weights (double quant "
            f"{'on' if q.bnb_4bit_use_double_quant else 'off'}, compute {cand.compute_dtype or 'float32'})")


def grid(cand) -> dict | None:
    """NF4/FP4 are float code books, not integer grids (nothing finetune.qat can train for)."""
    return None
