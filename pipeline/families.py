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
    # llama layout with q|k|v and gate|up fused), "phi" (the llama layout named q/k/v/dense and fc1/fc2, no
    # gate), "neox" (one Linear query_key_value whose rows are per head [q | k | v], attention as wide as hidden
    # as in GPT-2, partial rotary kept whole in each head, biases on every Linear and LayerNorm); None: depth cuts
    # only, for the reason in `no_width`
    layout: str | None
    lora_targets: tuple[str, ...]  # every projection of every block, as QLoRA does
    gguf_arch: str | None = None  # what the GGUF writer writes it as (None: it writes no GGUF for this family)
    quirks: tuple[str, ...] = ()
    no_width: str = ""
    # --- how formats/gguf.py writes the family (llama.cpp's convert_hf_to_gguf.py does the same per model class)
    # llama.cpp's llama architecture rotates interleaved pairs: q/k rows are permuted from Hugging Face's
    # rotate-half order (transformers' GGUF loader permutes them back for the llama architecture only)
    gguf_permute_qk: bool = False
    # added to every "...norm.weight": Hugging Face's Gemma RMSNorm computes x * (1 + w), llama.cpp's x * w;
    # llama.cpp's converter stores w + 1 and transformers' GGUF loader subtracts 1 again on load
    gguf_norm_shift: float = 0.0
    # llama.cpp slides the window written as `attention.sliding_window` (with the layer pattern it fixes per
    # architecture) and transformers' loader reads it back; False: both attend to the whole context, so a model
    # whose window is shorter than its context is refused
    gguf_window: bool = False
    gguf_activation: str = "silu"  # the MLP activation llama.cpp's architecture runs
    # config attributes transformers' GGUF loader does not read back for this architecture: it rebuilds the
    # config with its class default for them, so a model whose value differs would reload as another model
    gguf_unread: tuple[str, ...] = ()
    gguf_no: str = ""  # why no GGUF is written for the family (gguf_arch None), naming the library that lacks what


FAMILIES = (
    Family("GPT-2", ("gpt2",), "gpt2", ("c_attn", "c_proj", "c_fc"), "gpt2",
           ("fused Conv1D q|k|v stored [in, out]", "learned positions", "LayerNorm with biases", "tied head")),
    Family("Llama", ("llama",), "llama", LLAMA_PROJECTIONS, "llama",
           ("gated MLP", "grouped-query attention", "tied or untied head"), gguf_permute_qk=True),
    Family("Mistral", ("mistral",), "llama", LLAMA_PROJECTIONS, "llama", ("sliding-window attention", "untied head"),
           gguf_permute_qk=True),
    Family("Qwen2", ("qwen2",), "llama", LLAMA_PROJECTIONS, "qwen2",
           ("q/k/v biases", "sliding window above max_window_layers")),
    # transformers reads no head_dim for qwen3 GGUF files (no attention.key_length mapping): Qwen3's 128 only
    Family("Qwen3", ("qwen3",), "llama", LLAMA_PROJECTIONS, "qwen3", ("q/k RMSNorm over each head's dimensions",),
           gguf_unread=("head_dim", "attention_bias", "rope_parameters")),
    Family("Gemma", ("gemma",), "llama", LLAMA_PROJECTIONS, None,
           ("embeddings scaled by sqrt(hidden size)", "(1 + w) RMSNorm", "tied head"),
           gguf_no="transformers' GGUF loader reads no 'gemma' (Gemma 1) architecture (its GGUF_CONFIG_MAPPING "
                   "has gemma2 and gemma3 only), so the file could not be reloaded and scored; llama.cpp runs it"),
    # Gemma 2 / 3: llama.cpp scales attention by 1/sqrt(head_dim) and transformers reloads query_pre_attn_scalar
    # as its default 256, so both need head_dim = query_pre_attn_scalar = 256 (Gemma 2 2B/9B, Gemma 3 1B-12B);
    # llama.cpp fixes the sliding layers (every other one; five of six), which must be transformers' default
    Family("Gemma 2", ("gemma2",), "llama", LLAMA_PROJECTIONS, "gemma2",
           ("embedding scaling", "(1 + w) RMSNorm", "four norms a layer", "attention and final logit soft-capping",
            "sliding-window layers", "tied head"),
           gguf_norm_shift=1.0, gguf_window=True, gguf_activation="gelu_pytorch_tanh",
           gguf_unread=("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "layer_types",
                        "attention_bias", "rope_parameters")),
    Family("Gemma 3", ("gemma3_text",), "llama", LLAMA_PROJECTIONS, "gemma3",
           ("embedding scaling", "(1 + w) RMSNorm", "q/k RMSNorm", "sliding-window layer types",
            "local and global rope bases"),
           gguf_norm_shift=1.0, gguf_window=True, gguf_activation="gelu_pytorch_tanh",
           gguf_unread=("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "layer_types",
                        "attention_bias", "rope_parameters", "use_bidirectional_attention")),
    # SmolLM3 and Granite: the Llama layout under other names; transformers' GGUF loader reads neither back
    Family("SmolLM3", ("smollm3",), "llama", LLAMA_PROJECTIONS, None,
           ("NoPE layers (no_rope_layers: a depth cut keeps each layer's own)", "tied head"),
           gguf_no="transformers' GGUF loader reads no 'smollm3' architecture (no GGUF_CONFIG_MAPPING entry), so "
                   "the file could not be reloaded and scored; llama.cpp runs it"),
    Family("Granite", ("granite",), "llama", LLAMA_PROJECTIONS, None,
           ("embedding, residual, attention and logit multipliers", "tied or untied head"),
           gguf_no="transformers' GGUF loader reads no 'granite' architecture (no GGUF_CONFIG_MAPPING entry), so "
                   "the file could not be reloaded and scored; llama.cpp runs it"),
    Family("OLMo", ("olmo",), "llama", LLAMA_PROJECTIONS, None,
           ("LayerNorm without weights", "q/k/v clipping (clip_qkv)", "tied or untied head"),
           gguf_no="transformers' GGUF loader reads no 'olmo' architecture (no GGUF_CONFIG_MAPPING entry), so the "
                   "file could not be reloaded and scored; llama.cpp runs it"),
    Family("OLMo 2", ("olmo2",), "llama", LLAMA_PROJECTIONS, None,
           ("q/k RMSNorm over the whole projection (a head cut slices it)", "norms after attention and MLP",
            "untied head"),
           gguf_no="transformers' GGUF loader reads no 'olmo2' architecture (no GGUF_CONFIG_MAPPING entry), so the "
                   "file could not be reloaded and scored; llama.cpp runs it"),
    # llama.cpp disables Phi-3's sliding window (ggml-org/llama.cpp#13676) and transformers reads none back
    Family("Phi-3", ("phi3",), "phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "phi3",
           ("fused qkv_proj and gate_up_proj", "untied head"),
           gguf_unread=("rope_parameters",)),
    # Phi-1 / 1.5 / 2: the Llama layout's separate q/k/v under other names (dense, fc1/fc2: no gate), attention
    # and MLP side by side on one LayerNorm, biases everywhere, the head's too (a hidden cut leaves its [vocab]
    # bias whole); qk_layernorm sizes its norms hidden_size / heads, not head_dim, so a cut keeps that ratio
    Family("Phi", ("phi",), "phi", ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"), None,
           ("attention and MLP in parallel on one LayerNorm", "partial rotary", "biases on every Linear and LayerNorm",
            "untied head with a bias"),
           gguf_no="transformers' GGUF loader reads no 'phi2' architecture (no GGUF_CONFIG_MAPPING entry), so the "
                   "file could not be reloaded and scored; llama.cpp runs it"),
    Family("GPT-NeoX", ("gpt_neox",), "neox", ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), None,
           ("per-head interleaved query_key_value", "parallel residual", "partial rotary", "LayerNorm with biases",
            "tied or untied head"),
           gguf_no="transformers' GGUF loader reads no 'gptneox' architecture (no GGUF_CONFIG_MAPPING entry), so "
                   "the file could not be reloaded and scored; llama.cpp runs it"),
)
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def of(config) -> Family | None:
    """The family of a model config (None: not described here; depth cuts and generic defaults only)."""
    return BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def context_length(config) -> int | None:
    """The positions the model was built for (None where its config names none: ALiBi models have no table).
    A longer sequence indexes past a learned position table (GPT-2: an IndexError inside the forward pass) and
    runs a rotary model on positions it never saw."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def width_families() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES if f.layout)

