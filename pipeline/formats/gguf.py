"""The GGUF folder: one `.gguf` file (weights, tokenizer, chat template and hyper-parameters) that llama.cpp,
Ollama and LM Studio run, with the tokenizer files beside it; transformers reloads it with `gguf_file=`
(dequantized to float). The `gguf-*` candidates write it from a transformers folder.

Written with the `gguf` package the way llama.cpp's own `convert_hf_to_gguf.py` lays a model out: its
tensor-name maps, `GGUFWriter`, `SpecialVocab` for merges / special tokens / chat template, and
`gguf.quants` for the weight types it can write in numpy (F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1). The vocabulary is
llama.cpp's byte-level BPE ("gpt2": tokens and merges) or, for SentencePiece-style tokenizers, its SentencePiece
one ("llama": tokens and scores that rank them as the BPE merges do), whichever the tokenizer is.

Layout rules llama.cpp expects: GPT-2's `Conv1D` weights are stored transposed (as Linear weights);
Llama's q/k projection rows are permuted from Hugging Face's rotate-half order to llama.cpp's interleaved
rope order; Gemma's norm weights are stored as w + 1 (these and the other families' quirks are data in
pipeline/families.py, its `gguf_*` fields); a tied embedding is written once (llama.cpp and transformers
both reuse `token_embd` as the output head when `output.weight` is absent). Norms and biases stay F32.
The output head (or the tied embedding that serves as one) stays Q8_0 in the 4/5-bit types: llama.cpp's
`llama-quantize` gives it Q6_K (Q8_0 where the width is not a multiple of 256), and `gguf` cannot write
K-quants.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import families, models
from pipeline.formats import transformers as transformers_folder  # (not the library)

log = logging.getLogger("pipeline")

# transformers model_type -> GGUF architecture; both llama.cpp and transformers' GGUF loader run these.
ARCHITECTURES = {t: f.gguf_arch for f in families.FAMILIES if f.gguf_arch for t in f.model_types}
SUPPORTED = ("gpt2 (GPT-2, DistilGPT2), llama (Llama, SmolLM/SmolLM2, TinyLlama, Mistral without a sliding window), "
             "qwen2, qwen3, phi3 (without a sliding window), gemma2 and gemma3 (Gemma 3 text), "
             "with byte-level or SentencePiece-style (byte-fallback, \"▁\" spaces) BPE tokenizers")
# transformers names the model type of a GGUF architecture after it, except these
RELOADED_AS = {"gemma3": "gemma3_text"}
# type -> (GGML tensor type, llama.cpp file type, label used in file names and Ollama tags)
TYPES = {
    "f16": ("F16", "MOSTLY_F16", "F16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", "Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0", "Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1", "Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0", "Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1", "Q5_1"),
}
# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) for the byte-level BPE pre-tokenizers we recognise.
# llama.cpp picks the split regex by this name; without one it falls back to a default split and warns
# that generation quality will be degraded.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's (and Qwen3's) split regex: Llama 3's with single digits instead of runs of up to three
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": "GPT-2's byte-level regex (ByteLevel with use_regex)",
    "smollm": "SmolLM's single-digit split, then GPT-2's byte-level regex",
    "llama-bpe": "Llama 3's split regex, then ByteLevel",
    "qwen2": "Qwen2's split regex (Qwen2, Qwen3), then ByteLevel",
}
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}  # a Split step's regex -> llama.cpp's name


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF (architecture, tokenizer, layout); the message says what can."""


def unsupported(config) -> str | None:
    """Why a model with this config cannot be exported to GGUF, or None if it can."""
    model_type = getattr(config, "model_type", None)
    family = families.of(config)
    if family is not None and family.gguf_no:
        return f"GGUF export cannot write {family.name} ('{model_type}'): {family.gguf_no}"
    if model_type not in ARCHITECTURES:
        return f"GGUF export supports {SUPPORTED}; this model is '{model_type}'"
    arch = ARCHITECTURES[model_type]
    if model_type == "gpt2":
        inner = config.n_inner or 4 * config.n_embd
        if inner != 4 * config.n_embd:  # transformers' GGUF loader reads no n_inner: it could not reload this
            return (f"GGUF export of GPT-2 needs the standard MLP width 4 x n_embd = {4 * config.n_embd} "
                    f"(transformers' GGUF loader has no key for n_inner); this model has n_inner={inner}")
        if config.activation_function != "gelu_new":
            return f"GGUF GPT-2 runs gelu_new (tanh GELU); this model uses {config.activation_function}"
        return None
    if model_type == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        return "GGUF export of Llama models writes no attention/MLP biases; this model has attention_bias/mlp_bias"
    window = _window(config)
    if window is not None and not family.gguf_window:
        return (f"llama.cpp's {arch} architecture attends to the whole context (and transformers reads no window "
                f"back); this {model_type} model slides a {window}-token window over its "
                f"{config.max_position_embeddings} positions")
    activation = getattr(config, "hidden_activation", None) or config.hidden_act
    if activation != family.gguf_activation:
        return f"GGUF {arch} runs {family.gguf_activation} MLPs; this model uses {activation}"
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear", "yarn", "llama3"):
        return f"GGUF export writes default, linear, yarn and llama3 rope scaling; this model uses {rope['rope_type']}"
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != _head_dim(config):
        # llama-model.cpp: f_attention_scale = 1/sqrt(n_embd_head_k) (1/sqrt(n_embd/n_head) for the 27B sizes only)
        return (f"llama.cpp scales {arch} attention by 1/sqrt(head_dim) = 1/sqrt({_head_dim(config)}); this model "
                f"scales by 1/sqrt(query_pre_attn_scalar) = 1/sqrt({scalar})")
    if not config.tie_word_embeddings and not _has_output(arch):
        return (f"llama.cpp's {arch} architecture has no separate output head (it reuses the embedding); "
                "this model's is untied")
    if family.gguf_unread:
        back = reloaded_config(config)
        for key in family.gguf_unread:
            ours, theirs = _comparable(key, getattr(config, key, None)), _comparable(key, getattr(back, key, None))
            if ours != theirs:
                return (f"transformers' GGUF loader reads no {key} for {arch} files and would reload this model "
                        f"with {key}={theirs!r}; this model has {ours!r}")
    return None


def _window(config) -> int | None:
    """The sliding window when it is shorter than the context (a window covering every position is none)."""
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", True):  # Qwen2/3 keep a window size they do not use
        return None
    return window if window is not None and window < config.max_position_embeddings else None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _has_output(arch: str) -> bool:
    import gguf

    return gguf.MODEL_TENSOR.OUTPUT in gguf.MODEL_TENSORS[_arch(arch)]


def _arch(name: str):
    import gguf

    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def _comparable(key: str, value):
    """`value` as the reload check compares it: rope parameters per layer type (what each layer runs; transformers
    leaves unused top-level keys beside Gemma 3's per-type ones), floats at the float32 the file stores."""
    if key == "rope_parameters" and isinstance(value, dict):
        if any(isinstance(v, dict) for v in value.values()):
            return {k: _comparable(key, v) for k, v in value.items() if isinstance(v, dict)}
        return {k: _comparable(key, v) for k, v in value.items() if v is not None}
    if isinstance(value, float):
        return float(np.float32(value))
    return value


def reloaded_config(config):
    """The config transformers' GGUF loader builds from the metadata `write` puts in the file: the keys its
    GGUF_CONFIG_MAPPING maps for the architecture, class defaults for everything else."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = ARCHITECTURES[config.model_type]
    mapping = GGUF_CONFIG_MAPPING[arch]
    kwargs = {}
    for key, value in metadata(config, config.vocab_size).items():
        name = mapping.get(key.removeprefix(f"{arch}."))
        if name:
            kwargs[name] = float(np.float32(value)) if isinstance(value, float) else value
    return AutoConfig.for_model(RELOADED_AS.get(arch, arch), **kwargs)


def filename(name: str, qtype: str) -> str:
    """`<model>-Q8_0.gguf`, as GGUF repos on the Hub name their files (Ollama's `:Q8_0` tag matches it)."""
    return f"{name}-{TYPES[qtype][2]}.gguf"


@dataclass
class GGUFExport:
    """A pending export, so the quantize stage can treat GGUF like its other formats: `save_pretrained`
    writes the file into a folder (the stage then adds the tokenizer files beside it)."""

    source: Path
    qtype: str
    name: str
    trust_remote_code: bool = False
    output_tensor_type: str | None = None
    origin: str | None = None

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return write(self.source, folder / filename(self.name, self.qtype), self.qtype, self.name,
                     self.trust_remote_code, self.output_tensor_type, self.origin)


def _rope(config) -> dict:
    """The rope parameters of the full-attention layers (Gemma 3 keeps one set per layer type; llama.cpp takes
    the global layers' from the file and fixes the local ones, as transformers' default does)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rope.get("full_attention", rope))


def _spec(tokenizer) -> dict:
    """The tokenizer's tokenizer.json as a dict (the readers below take it parsed once per export)."""
    return json.loads(tokenizer.backend_tokenizer.to_str())


def pre_tokenizer(tokenizer, origin: str | None = None, spec: dict | None = None) -> str:
    """llama.cpp's pre-tokenizer name for `tokenizer`. The source GGUF's own name wins when the model came
    from one (`origin`, e.g. "smollm" for SmolLM2): transformers' GGUF loader rebuilds every llama-arch BPE
    tokenizer with the plain GPT-2 regex, so its structure no longer tells SmolLM's digit split apart."""
    inherited = source_pre(origin)
    if inherited:
        return inherited
    pre = (spec or _spec(tokenizer)).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") in SPLITS
            and not steps[1].get("use_regex", True)):
        return SPLITS[steps[0]["pattern"]["Regex"]]
    known = "; ".join(f"{k}: {v}" for k, v in PRE_TOKENIZERS.items())
    raise GGUFExportError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) matches none "
                          f"llama.cpp knows by name here ({known})")


def source_pre(origin: str | None) -> str | None:
    """`tokenizer.ggml.pre` of `origin`, when that is the GGUF file a model was loaded from."""
    from gguf import GGUFReader

    if not origin or Path(origin).suffix != ".gguf" or not Path(origin).is_file():
        return None
    field = GGUFReader(origin).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else None


SPACE = "\u2581"  # SentencePiece's visible space, "▁": its tokens carry spaces as this character
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte-fallback tokens, one per byte


def _steps(part: dict | None) -> list[dict]:
    """The steps of a tokenizer.json normalizer or pre-tokenizer (a Sequence's members, or the one step)."""
    part = part or {}
    key = {"Sequence": "pretokenizers" if "pretokenizers" in part else "normalizers"}.get(part.get("type"))
    return part.get(key, []) if key else ([part] if part else [])


def tokenizer_model(tokenizer, spec: dict | None = None) -> str:
    """llama.cpp's tokenizer family for `tokenizer` (`tokenizer.ggml.model`), read off its tokenizer.json:
    "llama" for SentencePiece-style BPE (Llama 2, Mistral, TinyLlama, Gemma saved as fast tokenizers: spaces
    written as "▁" by a Metaspace pre-tokenizer or a Replace normalizer, unknown bytes as <0xXX> tokens), which
    llama.cpp tokenizes by token scores; "gpt2" for byte-level BPE, which it tokenizes by merges."""
    spec = spec or _spec(tokenizer)
    model = spec["model"]
    if model["type"] != "BPE":
        raise GGUFExportError(f"GGUF export writes BPE tokenizers (byte-level, as GPT-2, Llama 3, SmolLM; or "
                              f"SentencePiece-style, as Llama 2, Mistral, Gemma); this tokenizer is {model['type']} "
                              "(a Unigram SentencePiece model, as T5's, would need llama.cpp's Unigram vocabulary, "
                              "which transformers' GGUF loader does not read back for these architectures)")
    marks_spaces = any(step.get("type") == "Metaspace" for step in _steps(spec.get("pre_tokenizer"))) or any(
        step.get("type") == "Replace" and step.get("content") == SPACE for step in _steps(spec.get("normalizer")))
    # byte fallback alone says nothing: transformers' reader of a byte-level GGUF vocabulary turns it on (every
    # byte is a token there); a pre-tokenizer llama.cpp does not know by name is refused by `pre_tokenizer`
    return "llama" if marks_spaces else "gpt2"


def vocab(tokenizer, n_vocab: int, kind: str) -> tuple[list[str], list[int]]:
    """Tokens by id and their types, as llama.cpp's converter writes them for a tokenizer of `kind`
    (`tokenizer_model`): special added tokens CONTROL, other added ones USER_DEFINED, ids the embedding has but
    the tokenizer lacks padded as `[PAD<id>]`; in a SentencePiece vocabulary also the unknown token UNKNOWN
    and the <0xXX> byte tokens BYTE (llama.cpp's byte fallback looks them up by that type)."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary has {n_vocab}")
    added = tokenizer.added_tokens_decoder
    spm = kind == "llama"
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.USER_DEFINED)
            continue
        tokens.append(by_id[i])
        if spm and i == tokenizer.unk_token_id:
            types.append(TokenType.UNKNOWN)
        elif spm and BYTE_TOKEN.fullmatch(by_id[i]):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def scores(tokenizer, tokens: list[str], spec: dict | None = None) -> list[float]:
    """SentencePiece token scores that make llama.cpp's tokenizer merge as the BPE merges do. llama.cpp (like
    SentencePiece's BPE) joins, again and again, the adjacent pair whose concatenation is the vocabulary token
    with the highest score; BPE applies the merge of lowest rank first. So a token scores minus the rank of
    the first merge that makes it. Tokens no merge makes (single characters, bytes, special and added tokens)
    are never the product of a merge in the source tokenizer: they score below every merge product, so a pair
    that happens to spell one is joined last. The pipeline's GGUF loader (models.sentencepiece_tokenizer), and
    transformers' reader of a llama-architecture file, rebuild merges from these scores the same way."""
    merges = (spec or _spec(tokenizer))["model"]["merges"]
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge  # tokenizers < 0.20 wrote "a b"
        first.setdefault(left + right, rank)
    unmade = -float(len(merges))
    return [-float(first[t]) if t in first else unmade for t in tokens]


def adds_space_prefix(tokenizer) -> bool:
    """Whether the tokenizer puts a "▁" before the text, as SentencePiece's dummy prefix does (llama.cpp's
    `tokenizer.ggml.add_space_prefix`): read off what it does to one letter, whichever of a Prepend normalizer
    or a Metaspace prepend_scheme does it."""
    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])[:1]
    return bool(first) and first[0].startswith(SPACE)


def llama_cpp_differs(tokenizer, spec: dict | None = None) -> str | None:
    """Where llama.cpp will tokenize text differently from this SentencePiece-style `tokenizer`, or None. llama.cpp
    puts its space prefix before text that already starts with a space and after every special token, as a
    normalizer that prepends "▁" does (Llama 2's tokenizer.json), but a Metaspace pre-tokenizer does not; and it
    never splits text at spaces before merging, which a Metaspace with `split` does."""
    spec = spec or _spec(tokenizer)
    found = []
    if adds_space_prefix(tokenizer):
        probe = tokenizer.convert_ids_to_tokens(tokenizer(" a", add_special_tokens=False)["input_ids"])
        if not "".join(probe).startswith(SPACE * 2):
            found.append("text that starts with a space or follows a special token gets one more leading "
                         f"'{SPACE}' in llama.cpp (its space prefix is always added there; this tokenizer's "
                         "Metaspace adds none before a space)")
    splits = any(s.get("type") == "Metaspace" and s.get("split", True) for s in _steps(spec.get("pre_tokenizer")))
    if splits and any(SPACE in t.lstrip(SPACE) for t in tokenizer.get_vocab()):
        found.append(f"llama.cpp may join tokens across words (the vocabulary has tokens with '{SPACE}' inside, "
                     "which this tokenizer's Metaspace split never forms)")
    return "; ".join(found) or None


def _adds(tokenizer) -> dict[str, bool]:
    """Whether the tokenizer object really adds BOS / EOS (its files may say otherwise)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    return {"bos": len(full) > len(plain) and full[0] == tokenizer.bos_token_id,
            "eos": len(full) > len(plain) and full[-1] == tokenizer.eos_token_id}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotate-half q/k rows -> llama.cpp's interleaved pairs (per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(model, arch) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in Hugging Face's (out, in) layout) for every weight, tied ones once."""
    import gguf

    cfg = model.config
    family = families.of(cfg)
    layers = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, layers)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    out = []
    for hf_name, t in model.state_dict().items():
        if tied and hf_name.startswith("lm_head."):
            continue
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):  # GPT-2's causal-mask buffers (older saves)
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"tensor '{hf_name}' has no GGUF name for {cfg.model_type}")
        w = t.detach().float().cpu().numpy()
        if cfg.model_type == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            w = w.T  # Conv1D stores (in, out)
        if family.gguf_permute_qk:  # llama.cpp's llama rope is interleaved, not rotate-half
            if hf_name.endswith("q_proj.weight"):
                w = _permute(w, cfg.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                w = _permute(w, cfg.num_key_value_heads)
        if family.gguf_norm_shift and hf_name.endswith("norm.weight"):
            w = w + np.float32(family.gguf_norm_shift)  # Gemma's (1 + w) norms as llama.cpp's plain x * w
        out.append((name, np.ascontiguousarray(w)))
    return out


def tensor_type(name: str, w: np.ndarray, qtype: str, tied: bool, output_type: str | None = None):
    """The GGML type of one tensor under file type `qtype` (see the module docstring); `output_type`
    (f16 / q8_0) overrides the output head's, as llama-quantize's --output-tensor-type does."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if w.ndim < 2 or name == "position_embd.weight":  # norms, biases; llama.cpp keeps position embeddings F32
        return Q.F32
    wanted = Q[TYPES[qtype][0]]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if output_type is not None:
            wanted = Q[TYPES[output_type][0]]
        elif qtype not in ("f16", "q8_0"):
            wanted = Q.Q8_0
    if wanted != Q.F16 and w.shape[-1] % GGML_QUANT_SIZES[wanted][0]:
        return Q.F16  # a row that does not fill whole blocks: llama.cpp falls back the same way
    return wanted


def write(source: Path, out: Path, qtype: str, name: str, trust_remote_code: bool = False,
          output_type: str | None = None, origin: str | None = None) -> Path:
    """Write the model folder `source` (weights, config and tokenizer files) as the GGUF file `out`; the
    output head (or tied embedding) in `output_type` when given. `origin`: the source the model's lineage
    was loaded from (records.origin), whose GGUF pre-tokenizer name the file keeps."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = Path(source)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    problem = unsupported(config)
    if problem:
        raise GGUFExportError(problem)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    arch = _arch(ARCHITECTURES[config.model_type])
    weights = tensors(model, arch)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tied = not any(n == "output.weight" for n, _ in weights)
    spec = _spec(tokenizer)
    kind = tokenizer_model(tokenizer, spec)
    tokens, types = vocab(tokenizer, n_vocab, kind)
    # llama.cpp's converter names no pre-tokenizer for SentencePiece vocabularies ("default": no regex split)
    pre = "default" if kind == "llama" else pre_tokenizer(tokenizer, origin, spec)

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[TYPES[qtype][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hyperparameters(writer, config, n_vocab)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # byte-level BPE is tokenized by its merges; a SentencePiece vocabulary by scores (and no merges, as llama.cpp's
    # converter writes it: transformers' GGUF reader then rebuilds the merges from the scores, as llama.cpp merges)
    special = gguf.SpecialVocab(source, load_merges=kind == "gpt2", n_vocab=n_vocab)
    if kind == "llama":
        writer.add_token_scores(scores(tokenizer, tokens, spec))
        writer.add_add_space_prefix(adds_space_prefix(tokenizer))
        differs = llama_cpp_differs(tokenizer, spec)
        if differs:  # the file is what llama.cpp's converter writes; the difference is llama.cpp's tokenizer
            log.warning("gguf: %s: llama.cpp's SentencePiece tokenizer departs from this tokenizer: %s", out.name,
                        differs)
    elif not special.merges:
        raise GGUFExportError(f"no BPE merges found in {source}/tokenizer.json")
    # the tokenizer object is the truth for ids and for whether BOS/EOS are added (SpecialVocab reads files)
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None:
            special.special_token_ids[role] = int(token_id)
    special.add_special_token.update(_adds(tokenizer))
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)

    counts: dict[str, int] = {}
    for tname, w in weights:
        ttype = tensor_type(tname, w, qtype, tied, output_type)
        counts[ttype.name] = counts.get(ttype.name, 0) + 1
        if ttype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tname, w.astype(np.float32))
        elif ttype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tname, w.astype(np.float16))
        else:
            writer.add_tensor(tname, gguf.quants.quantize(w, ttype), raw_dtype=ttype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(out)
    log.info("gguf: wrote %s (%s, tensors: %s, tokenizer %s, pre-tokenizer %s)", out.name, TYPES[qtype][2],
             ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), kind, pre)
    return out


def metadata(config, n_vocab: int) -> dict[str, int | float]:
    """The architecture keys llama.cpp reads (and transformers' GGUF loader maps back to a config), full key ->
    value (ints written as uint32, floats as float32). Rope scaling is written by `_hyperparameters`."""
    import gguf

    arch = ARCHITECTURES[config.model_type]
    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    if config.model_type == "gpt2":
        out = {K.CONTEXT_LENGTH: config.n_positions, K.EMBEDDING_LENGTH: config.n_embd,
               K.FEED_FORWARD_LENGTH: config.n_inner or 4 * config.n_embd, K.BLOCK_COUNT: config.n_layer,
               A.HEAD_COUNT: config.n_head, A.LAYERNORM_EPS: float(config.layer_norm_epsilon)}
        return {k.format(arch=arch): v for k, v in out.items()}
    family = families.of(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = _head_dim(config)
    rope = _rope(config)
    out = {K.VOCAB_SIZE: n_vocab, K.CONTEXT_LENGTH: config.max_position_embeddings,
           K.EMBEDDING_LENGTH: config.hidden_size, K.BLOCK_COUNT: config.num_hidden_layers,
           K.FEED_FORWARD_LENGTH: config.intermediate_size, A.HEAD_COUNT: heads, A.HEAD_COUNT_KV: kv_heads,
           R.DIMENSION_COUNT: head_dim,
           # always written: transformers reads Gemma's head_dim from it (its default 256 otherwise)
           A.KEY_LENGTH: head_dim, A.VALUE_LENGTH: head_dim,
           R.FREQ_BASE: float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
           A.LAYERNORM_RMS_EPS: float(config.rms_norm_eps)}
    if family.gguf_window and getattr(config, "sliding_window", None) is not None:
        out[A.SLIDING_WINDOW] = config.sliding_window
    for key, attr in ((K.ATTN_LOGIT_SOFTCAPPING, "attn_logit_softcapping"),
                      (K.FINAL_LOGIT_SOFTCAPPING, "final_logit_softcapping")):
        if getattr(config, attr, None) is not None:  # Gemma 2's tanh caps, which llama.cpp reads from these
            out[key] = float(getattr(config, attr))
    return {k.format(arch=arch): v for k, v in out.items()}


def _hyperparameters(writer, config, n_vocab: int) -> None:
    """The architecture keys of `metadata`, and rope scaling as llama.cpp reads it."""
    import gguf

    for key, value in metadata(config, n_vocab).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    if config.model_type == "gpt2":
        return
    rope = _rope(config)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind == "llama3":  # llama.cpp takes Llama 3.x scaling as per-frequency factors, a `rope_freqs` tensor
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(rope, _head_dim(config)))


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling as the divisor of each rotary frequency."""
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


# --- the format ------------------------------------------------------------------------------------------

NAME = "gguf"
BACKEND = "gguf"
PACKAGES = ["gguf"]
RUNTIME = ("gguf",)  # imported before a folder's peak memory is measured (pipeline/memprobe.py)
# GGUF types as llama.cpp names them; bits of the main weight type (Q8_0 stores 8.5 bits a weight, with scales)
METHODS = {"gguf-f16": 16, "gguf-q8_0": 8, "gguf-q4_0": 4, "gguf-q4_1": 4, "gguf-q5_0": 5, "gguf-q5_1": 5}
OPTIONS = {"output_tensor_type": tuple(METHODS)}


def file_of(folder: str | Path) -> Path | None:
    """The GGUF file of a GGUF model folder (as the gguf-* candidates write it, or a .gguf path itself);
    None for other folders. A folder with several .gguf files is ambiguous."""
    folder = Path(folder)
    if folder.suffix == ".gguf" and folder.is_file():
        return folder
    if (folder / "config.json").is_file() or not folder.is_dir():
        return None
    files = sorted(folder.glob("*.gguf"))
    if len(files) > 1:
        raise models.ModelSourceError(f"'{folder}' holds {len(files)} GGUF files "
                                      f"({', '.join(f.name for f in files)}); give the path of the one to load")
    return files[0] if files else None


def holds(folder: Path) -> bool:
    return file_of(folder) is not None


def load(folder: Path, **kwargs):
    """The file itself, dequantized by transformers' GGUF loader; its tokenizer from the tokenizer files saved
    beside it when there are some (the exact tokenizer the file was written from), else from the file's own
    vocabulary."""
    path = file_of(folder)
    model = models.load_model(models.Source("gguf", str(path.parent), path.name), **kwargs)
    has_files = (path.parent / "tokenizer_config.json").is_file()
    tokenizer = models.load_tokenizer(models.Source("folder", str(path.parent)) if has_files else
                                      models.Source("gguf", str(path.parent), path.name))
    return model, tokenizer


def weight_files(folder: Path) -> list[Path]:
    return [file_of(folder)]


def usage(folder: Path, ref: str) -> str:
    name = file_of(folder).name
    return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "# transformers dequantizes the GGUF weights to float32 on load\n"
            f'model = AutoModelForCausalLM.from_pretrained("{ref}", gguf_file="{name}")\n'
            + (f'tokenizer = AutoTokenizer.from_pretrained("{ref}")  # the tokenizer files beside it'
               if (folder / "tokenizer_config.json").is_file() else
               f'tokenizer = AutoTokenizer.from_pretrained("{ref}", gguf_file="{name}")'))


def card_section(folder: Path, repo_id: str | None) -> str:
    """llama.cpp and Ollama commands: the Hub repo once pushed, the local file before."""
    path = file_of(folder)
    tag = path.stem.rsplit("-", 1)[-1]  # <model>-Q8_0.gguf -> Q8_0, the tag Ollama and llama.cpp select by
    if repo_id:
        commands = (f"ollama run hf.co/{repo_id}:{tag}\n"
                    f"llama-cli -hf {repo_id}:{tag} -p \"The Python interpreter\"\n"
                    f"llama-server -hf {repo_id}:{tag}")
    else:
        commands = (f"llama-cli -m {path.name} -p \"The Python interpreter\"\n"
                    f"llama-server -m {path.name}\n"
                    f"# pushed to the Hub as <user>/<repo>: ollama run hf.co/<user>/<repo>:{tag}")
    return f"""
### llama.cpp, Ollama, LM Studio

`{path.name}` is a GGUF file ({tag}) with its tokenizer, chat template and hyper-parameters inside:

```bash
{commands}
```
"""


def lm_eval_model(model, tokenizer, folder: Path, batch_size: int):
    """The dequantized torch model, scored as a transformers folder's is."""
    return transformers_folder.lm_eval_model(model, tokenizer, folder, batch_size)


def unavailable(cand, device: torch.device) -> str | None:
    """Written in numpy, read back by transformers: any device."""
    import importlib.util

    return None if importlib.util.find_spec("gguf") else "needs the gguf package: pip install gguf"


def check(cand) -> list[str]:
    return []


def convert(cand, job) -> GGUFExport:
    """The export to write on `save`; the file is named after `job.name` (the recipe that made the input)."""
    return GGUFExport(Path(job.source), cand.method.removeprefix("gguf-"), job.name, job.trust_remote_code,
                      cand.output_tensor_type, job.origin)


def save(model: GGUFExport, folder: Path, tokenizer=None) -> None:
    model.save_pretrained(folder)
    if tokenizer is not None:  # the file holds the tokenizer for llama.cpp; these files are for transformers
        tokenizer.save_pretrained(folder)


def describe(cand) -> str:
    label = TYPES[cand.method.removeprefix("gguf-")][2]
    if cand.output_tensor_type:
        head = f"output head / tied embedding {cand.output_tensor_type.upper()}; "
    elif label in ("F16", "Q8_0"):
        head = ""
    else:
        head = "output head / tied embedding Q8_0, as llama.cpp keeps it at higher precision; "
    return f"GGUF {label} weights for llama.cpp/Ollama ({head}norms and biases F32)"


def grid(cand) -> dict | None:
    """llama.cpp's 4/5-bit types round blocks of 32 weights (what finetune.qat can train for)."""
    if cand.method in ("gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1"):
        return {"bits": int(cand.method[6]), "group_size": 32, "symmetric": cand.method.endswith("_0")}
    return None
