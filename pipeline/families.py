"""Model families, each described once: which transformers `model_type`s belong to it, how its weights are laid
out (what the prune stage's width cuts slice), which layers LoRA adapts by default, which llama.cpp
architecture the GGUF writer writes for it, and its quirks. The stages and formats read this table instead of
branching on model types of their own; docs/reference.md's support table is generated from it."""
from __future__ import annotations

from dataclasses import dataclass

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # how width cuts slice it: "gpt2" (fused Conv1D q|k|v, weights stored [in, out]), "llama" (separate q/k/v/o
    # and gate/up/down projections; grouped-query attention keeps or drops whole KV groups), "phi3" (the
    # llama layout with q|k|v and gate|up fused); None: depth cuts only, for the reason in `no_width`
    layout: str | None
    lora_targets: tuple[str, ...]  # every projection of every block, as QLoRA does
    gguf_arch: str | None = None  # what the GGUF writer writes it as (None: it writes no GGUF for this family)
    quirks: tuple[str, ...] = ()
    no_width: str = ""


FAMILIES = (
    Family("GPT-2", ("gpt2",), "gpt2", ("c_attn", "c_proj", "c_fc"), "gpt2",
           ("fused Conv1D q|k|v stored [in, out]", "learned positions", "LayerNorm with biases", "tied head")),
    Family("Llama", ("llama",), "llama", LLAMA_PROJECTIONS, "llama",
           ("gated MLP", "grouped-query attention", "tied or untied head")),
    Family("Mistral", ("mistral",), "llama", LLAMA_PROJECTIONS, "llama", ("sliding-window attention", "untied head")),
    Family("Qwen2", ("qwen2",), "llama", LLAMA_PROJECTIONS, "qwen2",
           ("q/k/v biases", "sliding window above max_window_layers")),
    Family("Qwen3", ("qwen3",), "llama", LLAMA_PROJECTIONS, None, ("q/k RMSNorm over each head's dimensions",)),
    Family("Gemma", ("gemma",), "llama", LLAMA_PROJECTIONS, None,
           ("embeddings scaled by sqrt(hidden size)", "(1 + w) RMSNorm", "tied head")),
    Family("Gemma 2", ("gemma2",), "llama", LLAMA_PROJECTIONS, None,
           ("embedding scaling", "four norms a layer", "attention and final logit soft-capping",
            "sliding-window layers")),
    Family("Gemma 3", ("gemma3_text",), "llama", LLAMA_PROJECTIONS, None,
           ("embedding scaling", "q/k RMSNorm", "sliding-window layer types")),
    Family("Phi-3", ("phi3",), "phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), None,
           ("fused qkv_proj and gate_up_proj", "untied head")),
    Family("GPT-NeoX", ("gpt_neox",), None, ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), None,
           ("per-head interleaved query_key_value", "parallel residual", "partial rotary", "LayerNorm with biases"),
           no_width="its per-head interleaved query_key_value and biased LayerNorms are not cut yet"),
)
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def of(config) -> Family | None:
    """The family of a model config (None: not described here; depth cuts and generic defaults only)."""
    return BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def width_families() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES if f.layout)

