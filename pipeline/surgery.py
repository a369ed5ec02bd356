"""Cutting a model down: layers, attention heads, MLP channels and hidden (embedding) channels.

One place for every cut the pipeline makes, used by the `prune` stage and by `distill`'s layer-subset
student. A cut is a `Cut` (what to keep, in teacher indices); `apply` builds a smaller model of the
same class from a smaller config and copies the kept slices of every weight into it, so the result is
an ordinary `transformers` model (`save_pretrained` / `from_pretrained`, KV cache, `generate`) with no
custom code. Importance is measured by `measure` with forward hooks on calibration blocks.

Width cuts follow each family's weight layout (pipeline/families.py): GPT-2's fused `Conv1D` layers (stored
[in, out]); the Llama layout (Llama, Mistral, Qwen2/3, Gemma 1/2/3: grouped-query attention keeps or drops whole
KV groups); Phi-3's, the same with q|k|v and gate|up fused; Phi-1/2's, the same named q/k/v/dense and fc1/fc2
with biases; GPT-NeoX's (one Linear q|k|v interleaved per head,
partial rotary), whose attention is as wide as the residual stream, as GPT-2's is. Depth cuts (dropping layers)
work on any architecture whose decoder layers are one `ModuleList`.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

import torch

from pipeline import families
from pipeline.errors import StageError


def layout(config) -> str | None:
    """How width cuts slice this model's weights (pipeline.families): "gpt2", "llama", "phi3", "phi", "neox"; None
    if they cannot."""
    described = families.of(config)
    return described.layout if described else None


# layouts whose attention is exactly as wide as the residual stream (their configs have no head_dim):
# num_attention_heads x head size = hidden_size, so cutting heads narrows hidden and cutting hidden narrows every
# head (`Cut.head_dims`); there is no grouped-query attention
TIED = ("gpt2", "neox")


def tied(config) -> bool:
    """Whether the model's attention width is its hidden size (see TIED)."""
    return layout(config) in TIED


def rotary_dims(config) -> int:
    """The leading dimensions of each head that GPT-NeoX's partial rotary embedding rotates (0 for the other
    layouts, whose rotary covers the whole head or which have none). A cut keeps them all, in order: the rotary
    pairs dimension i with i + rotary / 2 and its frequencies depend on how many there are."""
    if layout(config) != "neox":
        return 0
    factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return int(head_dim(config) * factor)


def _rotary_factor(rotary: int, dim: int) -> float:
    """The partial_rotary_factor with which a head of `dim` dimensions rotates exactly `rotary` of them
    (transformers computes int(dim * factor))."""
    factor = min(1.0, rotary / dim)
    while int(dim * factor) < min(rotary, dim):
        factor = math.nextafter(factor, 2.0)
    return factor


def family(config) -> str:
    """The weight layout of a model width cuts can slice; a StageError saying why not for the others."""
    found = layout(config)
    if found is not None:
        return found
    described = families.of(config)
    why = (f"for {described.name} ('{described.model_types[0]}'), {described.no_width}" if described and described.no_width
           else f"this model is '{getattr(config, 'model_type', None)}'")
    raise StageError(f"prune: width pruning supports {families.width_families()}; {why}. "
                     "Drop layers only (prune.num_hidden_layers, or prune.axes: [depth]) or use distill.every/keep/layers")


def sizes(config) -> dict:
    """The dimensions a cut can change, under the names of the Llama config (GPT-2's n_* included)."""
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "intermediate_size": intermediate_size(config),
        "head_dim": head_dim(config),
    }


def intermediate_size(config) -> int | None:
    if config.model_type == "gpt2":
        return config.n_inner or 4 * config.n_embd
    # other families name it otherwise (OPT: ffn_dim); sizes of a family width pruning does not know are only
    # read, never cut (`family` refuses those)
    return getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass
class Cut:
    """What a smaller model keeps, as indices into the teacher (sorted, so order is preserved)."""

    layers: list[int]  # teacher layers kept, in order
    hidden: list[int] | None = None  # residual-stream channels kept (None: all)
    mlp: dict[int, list[int]] = field(default_factory=dict)  # teacher layer -> MLP channels kept (absent: all)
    heads: dict[int, list[int]] = field(default_factory=dict)  # teacher layer -> heads kept (Llama: KV groups)
    # GPT-2 ties the attention width to the hidden size: teacher layer -> per kept head, the (q/k dims, v dims)
    # it keeps when the head dimension shrinks
    head_dims: dict[int, list[tuple[list[int], list[int]]]] = field(default_factory=dict)
    refit: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # teacher layer -> refitted weights


def decoder_stack(model) -> tuple[str, torch.nn.ModuleList]:
    """The state-dict prefix and module of the model's decoder layers (GPT-2's `h`, Llama's `layers`)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise StageError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def config_for(config, target: dict, layers: list[int] | None = None):
    """`config` with the dimensions in `target` (keys of `sizes`; absent ones stay); its per-layer entries those of
    the teacher `layers` kept (default: the first `num_hidden_layers`)."""
    original, config = config, copy.deepcopy(config)
    before = sizes(config)
    s = {**before, **{k: v for k, v in target.items() if v is not None}}
    n = s["num_hidden_layers"]
    if layers is not None or n != config.num_hidden_layers:
        keep_layers(original, config, list(range(n)) if layers is None else layers)
    config.num_hidden_layers = n
    if getattr(config, "max_window_layers", None) is not None:  # Qwen2: sliding window above this layer
        config.max_window_layers = min(config.max_window_layers, n)
    if all(s[k] == v for k, v in before.items() if k != "num_hidden_layers"):
        # a depth cut leaves the width as the config states it: families width cuts do not know may derive
        # their sizes otherwise (Falcon's head_dim is a read-only property)
        return config
    if config.model_type == "gpt2":
        config.n_inner, config.n_embd, config.n_head = s["intermediate_size"], s["hidden_size"], s["num_attention_heads"]
    elif layout(config) == "neox":
        # no head_dim: the attention computes it as hidden_size / heads (and the rotary embedding would read a
        # head_dim set here instead); a narrower head keeps its rotary dimensions by a larger rotary factor
        rotary, old_dim = rotary_dims(config), head_dim(config)
        config.intermediate_size, config.hidden_size = s["intermediate_size"], s["hidden_size"]
        config.num_attention_heads = s["num_attention_heads"]
        dim = s["hidden_size"] // s["num_attention_heads"]
        if dim != old_dim:
            config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": _rotary_factor(rotary, dim)}
    else:
        config.intermediate_size, config.hidden_size = s["intermediate_size"], s["hidden_size"]
        config.num_attention_heads, config.num_key_value_heads = s["num_attention_heads"], s["num_key_value_heads"]
        config.head_dim = s["head_dim"]  # explicit: hidden_size / heads no longer gives it
    return config


# config entries that list layer indices: Qwen-MoE's layers with a dense MLP instead of experts, Llama 4's MoE
# layers, LFM2's attention layers (the others convolve)
LAYER_INDEX_KEYS = ("mlp_only_layers", "moe_layers", "full_attn_idxs")


def keep_layers(config, out, layers: list[int]) -> None:
    """Point `out`'s per-layer config entries at the teacher layers it keeps: a list with one entry per layer
    (`layer_types`; SmolLM3's `no_rope_layers`, read when a layer is built, so a wrong entry would run a NoPE
    layer with rotary positions and no weight would tell) takes the kept layers' entries; lists of layer indices
    (LAYER_INDEX_KEYS; Qwen-MoE's `decoder_sparse_step`: experts on every k-th layer) are renumbered to the kept
    ones."""
    n = config.num_hidden_layers
    for key, value in config.to_dict().items():
        if key in LAYER_INDEX_KEYS or key == "architectures" or key.endswith(("token_id", "token_ids")):
            continue
        if isinstance(value, list) and len(value) == n:
            setattr(out, key, [value[i] for i in layers])
    step = getattr(config, "decoder_sparse_step", None)
    for key in LAYER_INDEX_KEYS:
        listed = getattr(config, key, None)
        if not isinstance(listed, list):
            continue
        chosen = set(listed)
        if key == "mlp_only_layers" and isinstance(step, int) and step > 1:
            # Qwen-MoE: experts where (index + 1) % step == 0, which renumbering breaks
            chosen |= {i for i in range(n) if (i + 1) % step}
            out.decoder_sparse_step = 1
        setattr(out, key, [j for j, i in enumerate(layers) if i in chosen])


def new_config(model, cut: Cut):
    """The teacher's config with the dimensions the cut leaves."""
    config = model.config
    first = cut.layers[0] if cut.layers else 0
    target = {"num_hidden_layers": len(cut.layers)}
    if cut.mlp:
        target["intermediate_size"] = len(cut.mlp[first])
    if cut.hidden is not None:
        target["hidden_size"] = len(cut.hidden)
    if cut.heads:
        kept = len(cut.heads[first])
        if tied(config):
            target["num_attention_heads"] = kept
        else:
            s = sizes(config)
            target.update(num_key_value_heads=kept,
                          num_attention_heads=kept * (s["num_attention_heads"] // s["num_key_value_heads"]))
    return config_for(config, target, cut.layers)


def apply(model, cut: Cut):
    """A new, smaller model of the same class holding the kept slices of `model`'s weights."""
    from transformers import AutoModelForCausalLM

    width = cut.hidden is not None or cut.mlp or cut.heads or cut.head_dims or cut.refit
    fam = family(model.config) if width else None
    config = new_config(model, cut)
    prefix, _ = decoder_stack(model)
    dtype = next(model.parameters()).dtype
    source = model.state_dict()
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    target = {}
    for key, tensor in source.items():
        match = pattern.match(key)
        if match is None:
            new_key, layer, rest = key, None, key
        else:
            layer, rest = int(match.group(1)), match.group(2)
            if layer not in cut.layers:
                continue
            new_key = f"{prefix}.{cut.layers.index(layer)}.{rest}"
        if fam is not None:
            tensor = _slice(fam, model.config, cut, layer, rest, cut.refit.get(layer, {}).get(rest, tensor))
        target[new_key] = tensor
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = student.load_state_dict(target, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise StageError(f"prune: the cut model's weights do not fit its config (missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}); this architecture is not supported")
    student.tie_weights()
    student.generation_config = copy.deepcopy(model.generation_config)
    return student.eval()  # as from_pretrained leaves it (GPT-2's dropout would otherwise be on)


def _take(t: torch.Tensor, dim: int, idx: list[int] | None) -> torch.Tensor:
    if idx is None:
        return t
    return t.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device))


def _head_rows(heads: list[int], dim: int) -> list[int]:
    return [h * dim + d for h in heads for d in range(dim)]


def _slice(fam: str, config, cut: Cut, layer: int | None, name: str, t: torch.Tensor) -> torch.Tensor:
    """The kept part of one weight. `name` is the key inside its decoder layer, or the full key outside."""
    hid = cut.hidden
    if fam == "neox":
        return _slice_neox(config, cut, layer, name, t)
    if fam != "gpt2":  # the Llama layout, Phi-3's with fused q|k|v and gate|up, Phi's with other names
        if layer is None:  # embed_tokens [V, H], norm [H], lm_head [V, H]; Phi's head bias is [V]
            return t if name == "lm_head.bias" else _take(t, t.dim() - 1, hid)
        module, _, kind = name.rpartition(".")
        if module.endswith("layernorm") and module not in ("self_attn.q_layernorm", "self_attn.k_layernorm"):
            return _take(t, 0, hid)  # the residual stream's norms (Phi's with a bias); Phi's q/k norms are per head
        dim, s = head_dim(config), sizes(config)
        per_group = s["num_attention_heads"] // s["num_key_value_heads"]
        groups = cut.heads.get(layer)
        q_rows = _head_rows([g * per_group + i for g in groups for i in range(per_group)], dim) if groups else None
        kv_rows = _head_rows(groups, dim) if groups else None
        mlp = cut.mlp.get(layer)
        if module in ("self_attn.q_norm", "self_attn.k_norm") and t.shape[0] != dim:
            # OLMo 2 normalises the whole q / k projection (a weight per row of it); Qwen3 and Gemma 3 each head
            return _take(t, 0, q_rows if module == "self_attn.q_norm" else kv_rows)
        q_width, kv_width, inner = s["num_attention_heads"] * dim, s["num_key_value_heads"] * dim, s["intermediate_size"]
        qkv = None if groups is None else [*q_rows, *(q_width + r for r in kv_rows),
                                           *(q_width + kv_width + r for r in kv_rows)]
        rows, cols = {
            "self_attn.q_proj": (q_rows, hid), "self_attn.k_proj": (kv_rows, hid), "self_attn.v_proj": (kv_rows, hid),
            "self_attn.o_proj": (hid, q_rows), "mlp.gate_proj": (mlp, hid), "mlp.up_proj": (mlp, hid),
            "mlp.down_proj": (hid, mlp),
            # Phi: dense is o_proj, fc1 / fc2 the MLP's in / out (no gate)
            "self_attn.dense": (hid, q_rows), "mlp.fc1": (mlp, hid), "mlp.fc2": (hid, mlp),
            # Phi-3: [q | k | v] and [gate | up] stacked in one weight each
            "self_attn.qkv_proj": (qkv, hid), "mlp.gate_up_proj": (None if mlp is None else [*mlp, *(inner + j for j in mlp)], hid),
        }.get(module, (None, None))
        t = _take(t, 0, rows)
        return _take(t, 1, cols) if kind == "weight" else t
    # GPT-2: Conv1D weights are [in, out]; c_attn's output is [q | k | v], each n_embd wide
    if layer is None:  # wte [V, H], wpe [P, H], ln_f [H], lm_head [V, H]
        return _take(t, t.dim() - 1, hid)
    if name.startswith(("ln_1.", "ln_2.")):
        return _take(t, 0, hid)
    width, heads = config.n_embd, cut.heads.get(layer) or list(range(config.n_head))
    dim = width // config.n_head
    dims = cut.head_dims.get(layer) or [(list(range(dim)), list(range(dim)))] * len(heads)
    qk = [h * dim + d for h, (keep, _) in zip(heads, dims) for d in keep]
    v = [h * dim + d for h, (_, keep) in zip(heads, dims) for d in keep]
    inner = bool(cut.heads or cut.head_dims)
    mlp = cut.mlp.get(layer)
    if name.startswith("attn.c_attn."):
        cols = [*qk, *(width + i for i in qk), *(2 * width + i for i in v)] if inner else None
        out = _take(t, t.dim() - 1, cols)
        if inner and len(dims[0][0]) != dim:
            # the attention scale is 1/sqrt(head_dim): keep q·k/sqrt(d) as the teacher computed it
            scale = (len(dims[0][0]) / dim) ** 0.5
            out = out.clone()
            out[..., : len(qk)] *= scale
        return _take(out, 0, hid) if name.endswith("weight") else out
    if name.startswith("attn.c_proj."):
        if name.endswith("weight"):
            return _take(_take(t, 0, v if inner else None), 1, hid)
        return _take(t, 0, hid)
    if name.startswith("mlp.c_fc."):
        out = _take(t, t.dim() - 1, mlp)
        return _take(out, 0, hid) if name.endswith("weight") else out
    if name.startswith("mlp.c_proj."):
        if name.endswith("weight"):
            return _take(_take(t, 0, mlp), 1, hid)
        return _take(t, 0, hid)
    return t


def _slice_neox(config, cut: Cut, layer: int | None, name: str, t: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX: query_key_value's output rows are per head [q | k | v], each head_dim wide (the attention views
    them as [heads, 3 x head_dim] and chunks that); Linear weights [out, in], every one with a bias."""
    hid = cut.hidden
    if layer is None:  # embed_in [V, H], final_layer_norm [H], embed_out [V, H]
        return _take(t, t.dim() - 1, hid)
    if name.startswith(("input_layernorm.", "post_attention_layernorm.")):
        return _take(t, 0, hid)
    s = sizes(config)
    dim = s["head_dim"]
    heads = cut.heads.get(layer) or list(range(s["num_attention_heads"]))
    dims = cut.head_dims.get(layer) or [(list(range(dim)), list(range(dim)))] * len(heads)
    inner = bool(cut.heads or cut.head_dims)
    v = [h * dim + d for h, (_, keep) in zip(heads, dims) for d in keep] if inner else None
    mlp = cut.mlp.get(layer)
    module, _, kind = name.rpartition(".")
    if module == "attention.query_key_value":
        rows = [h * 3 * dim + offset + d for h, (qk, vd) in zip(heads, dims)
                for offset, keep in ((0, qk), (dim, qk), (2 * dim, vd)) for d in keep] if inner else None
        out = _take(t, 0, rows)
        new_dim = len(dims[0][0])
        if new_dim != dim:  # the attention scale is 1/sqrt(head_dim): keep q·k/sqrt(d) as the teacher computed it
            out = out.clone()
            out.view(len(heads), 3 * new_dim, *out.shape[1:])[:, :new_dim] *= (new_dim / dim) ** 0.5
        return _take(out, 1, hid) if kind == "weight" else out
    rows, cols = {"attention.dense": (hid, v), "mlp.dense_h_to_4h": (mlp, hid),
                  "mlp.dense_4h_to_h": (hid, mlp)}.get(module, (None, None))
    t = _take(t, 0, rows)
    return _take(t, 1, cols) if kind == "weight" else t


def count_params(config, embeddings: bool = True) -> int:
    """Parameters of a model built from `config`, counted on the meta device (no memory, no init); without
    `embeddings`, the vocabulary-sized matrices (the token embedding, an untied LM head) are left out."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # a tied head is the embedding's own parameter: once
    if not embeddings:
        vocab = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                 if m is not None and getattr(m, "weight", None) is not None}
        total -= sum(vocab.values())
    return total


@dataclass
class Importance:
    """What each part of the model contributes on the calibration blocks (higher = more important)."""

    tokens: int
    layers: list[float]  # block influence: mean over tokens of 1 - cos(layer input, layer output) (ShortGPT)
    hidden: list[float] | None = None  # per residual channel: mean |output| of every norm, summed (Minitron)
    mlp: list[list[float]] | None = None  # per layer, per MLP channel: its energy or mean |activation| (measure)
    heads: list[list[float]] | None = None  # per layer, per head (Llama: per KV group): mean L2 norm of its output
    qk: list[list[list[float]]] | None = None  # GPT-2, GPT-NeoX: per layer, head, dim: sqrt(E[q^2] E[k^2])
    v: list[list[list[float]]] | None = None  # GPT-2, GPT-NeoX: per layer, head, dim: mean |attention output|
    grams: dict = field(default_factory=dict)  # (layer, module) -> X^T X of that projection's input (refit)

    def summary(self, digits: int = 5) -> dict:
        """The scores as plain lists for the stage record."""
        def r(x):
            return [r(v) for v in x] if isinstance(x, list) else float(f"{x:.{digits}g}")
        return {k: r(getattr(self, k)) for k in ("layers", "hidden", "mlp", "heads", "qk", "v")
                if getattr(self, k) is not None} | {"tokens": self.tokens}


def _modules(fam: str, layer) -> dict:
    """The projections a width cut touches in one decoder layer."""
    if fam == "gpt2":
        return {"attn_in": layer.attn.c_attn, "attn_out": layer.attn.c_proj, "mlp_out": layer.mlp.c_proj}
    if fam == "neox":
        return {"attn_in": layer.attention.query_key_value, "attn_out": layer.attention.dense,
                "mlp_out": layer.mlp.dense_4h_to_h}
    if fam == "phi":
        return {"attn_out": layer.self_attn.dense, "mlp_out": layer.mlp.fc2}
    return {"attn_out": layer.self_attn.o_proj, "mlp_out": layer.mlp.down_proj}


REFIT_NAMES = {("gpt2", "attn_out"): "attn.c_proj.weight", ("gpt2", "mlp_out"): "mlp.c_proj.weight",
               ("neox", "attn_out"): "attention.dense.weight", ("neox", "mlp_out"): "mlp.dense_4h_to_h.weight",
               ("phi", "attn_out"): "self_attn.dense.weight", ("phi", "mlp_out"): "mlp.fc2.weight",
               **{(fam, "attn_out"): "self_attn.o_proj.weight" for fam in ("llama", "phi3")},
               **{(fam, "mlp_out"): "mlp.down_proj.weight" for fam in ("llama", "phi3")}}


def run_hooked(model, blocks: torch.Tensor, batch_size: int, device, hooks: list) -> None:
    """Run the calibration blocks through the model, `batch_size` at a time, for the forward hooks to measure what
    they need; the hooks are removed whatever happens."""
    try:
        for start in range(0, len(blocks), batch_size):
            model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def measure(model, blocks: torch.Tensor, batch_size: int = 8, width: bool = True, grams: bool = False,
            mlp_importance: str = "energy") -> Importance:
    """Run the calibration blocks [N, T] through the model once, with hooks that accumulate importance.

    MLP channels: "activation" ranks channel j by mean |x_j| of its activation (Minitron); "energy" by
    E[x_j^2] * ||W_out[:, j]||^2, what the channel adds to the layer's output on average, so a strongly
    active channel that the down projection barely reads ranks low (on the quick start's teacher, before any
    KD, lower validation perplexity than "activation" at 60% and 80%; `bench/compress.py --zero-shot-only
    --override prune.mlp_importance=activation` compares them)."""
    model.eval()
    cfg = model.config
    _, stack = decoder_stack(model)
    n_layers = len(stack)
    fam = family(cfg) if width else None
    device = next(model.parameters()).device
    acc: dict = {"bi": torch.zeros(n_layers, dtype=torch.float64)}
    hooks = []

    def add(key, value):
        value = value.detach().double().cpu()
        acc[key] = acc[key] + value if key in acc else value

    def layer_hook(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            acc["bi"][i] += (1 - cos).sum().double().cpu()
        return hook

    for i, layer in enumerate(stack):
        hooks.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
    if fam is not None:
        heads, dim = cfg.num_attention_heads, head_dim(cfg)
        # (OLMo's LayerNorms have no weight: their normalized shape says they are the residual stream's)
        norms = [m for m in model.modules() if "norm" in type(m).__name__.lower()
                 and (m.weight.shape if getattr(m, "weight", None) is not None
                      else tuple(getattr(m, "normalized_shape", ()))) == (cfg.hidden_size,)]
        for m in norms:
            hooks.append(m.register_forward_hook(lambda mod, a, out: add("hidden", out.abs().sum((0, 1)))))
        for i, layer in enumerate(stack):
            mods = _modules(fam, layer)

            def pre(key, i=i):
                def hook(module, args):
                    x = args[0].float()
                    flat = x.reshape(-1, x.shape[-1])
                    if key == "mlp_out":
                        add(("mlp", i), flat.abs().sum(0) if mlp_importance == "activation" else flat.pow(2).sum(0))
                    else:  # merged heads [tokens, heads * dim]
                        per_head = flat.view(-1, heads, dim)
                        add(("heads", i), per_head.norm(dim=-1).sum(0))
                        add(("v", i), per_head.abs().sum(0))
                    if grams:
                        add(("gram", i, key), flat.T @ flat)
                return hook

            hooks.append(mods["mlp_out"].register_forward_pre_hook(pre("mlp_out")))
            hooks.append(mods["attn_out"].register_forward_pre_hook(pre("attn_out")))
            if fam in TIED:
                def qk_hook(module, args, out, i=i):
                    if fam == "gpt2":  # [q | k | v], each n_embd wide
                        q, k, _ = (x.reshape(-1, heads, dim) for x in out.float().split(cfg.n_embd, dim=-1))
                    else:  # GPT-NeoX: per head [q | k | v], each head_dim wide
                        q, k, _ = out.float().reshape(-1, heads, 3 * dim).split(dim, dim=-1)
                    add(("q2", i), q.pow(2).sum(0))
                    add(("k2", i), k.pow(2).sum(0))
                hooks.append(mods["attn_in"].register_forward_hook(qk_hook))
    run_hooked(model, blocks, batch_size, device, hooks)
    tokens = blocks.numel()
    imp = Importance(tokens=tokens, layers=(acc["bi"] / tokens).tolist())
    if fam is None:
        return imp
    imp.hidden = (acc["hidden"] / tokens).tolist()
    imp.mlp = [(acc[("mlp", i)] / tokens * (1 if mlp_importance == "activation" else _out_norms2(fam, stack[i])))
               .tolist() for i in range(n_layers)]
    head_scores = [acc[("heads", i)] / tokens for i in range(n_layers)]
    if fam not in TIED:  # a KV group goes as a whole: its query heads' scores added up
        groups = sizes(cfg)["num_key_value_heads"]
        head_scores = [h.view(groups, -1).sum(-1) for h in head_scores]
    else:
        imp.qk = [((acc[("q2", i)] * acc[("k2", i)]).sqrt() / tokens).tolist() for i in range(n_layers)]
        imp.v = [(acc[("v", i)] / tokens).tolist() for i in range(n_layers)]
    imp.heads = [h.tolist() for h in head_scores]
    imp.grams = {(i, key): acc[("gram", i, key)] for i in range(n_layers) for key in ("attn_out", "mlp_out")
                 if ("gram", i, key) in acc}
    return imp


def _out_norms2(fam: str, layer) -> torch.Tensor:
    """||W[:, j]||^2 for each input channel j of the layer's MLP output projection."""
    w = _modules(fam, layer)["mlp_out"].weight.detach().double().cpu()
    return w.pow(2).sum(1 if fam == "gpt2" else 0)  # Conv1D stores [in, out], Linear [out, in]


def _top(scores, k: int) -> list[int]:
    """Indices of the k highest scores, in their original order."""
    return sorted(torch.as_tensor(scores).topk(k).indices.tolist())


def plan(model, imp: Importance, target: dict, refit: bool = False) -> Cut:
    """Keep the most important layers, heads and channels so that the model has the `target` sizes."""
    s = sizes(model.config)
    t = {**s, **{k: v for k, v in target.items() if v is not None}}
    cut = Cut(layers=_top(imp.layers, t["num_hidden_layers"]))
    if all(t[k] == s[k] for k in s if k != "num_hidden_layers"):  # depth only (width was not even measured)
        return cut
    fam = family(model.config)
    if t["hidden_size"] < s["hidden_size"]:
        cut.hidden = _top(imp.hidden, t["hidden_size"])
    for i in cut.layers:
        if t["intermediate_size"] < s["intermediate_size"]:
            cut.mlp[i] = _top(imp.mlp[i], t["intermediate_size"])
        kept_heads = t["num_key_value_heads"] if fam not in TIED else t["num_attention_heads"]
        if kept_heads < len(imp.heads[i]):
            cut.heads[i] = _top(imp.heads[i], kept_heads)
        if fam in TIED and t["hidden_size"] // t["num_attention_heads"] < s["head_dim"]:
            new_dim = t["hidden_size"] // t["num_attention_heads"]
            heads = cut.heads.get(i) or list(range(s["num_attention_heads"]))
            rotary = rotary_dims(model.config)  # kept whole, first; the other q/k dimensions by importance
            cut.head_dims[i] = [([*range(rotary), *(rotary + d for d in _top(imp.qk[i][h][rotary:], new_dim - rotary))],
                                 _top(imp.v[i][h], new_dim)) for h in heads]
    if refit:
        cut.refit = refit_weights(model, imp, cut)
    return cut


def refit_weights(model, imp: Importance, cut: Cut, ridge: float = 1e-3) -> dict:
    """Least-squares re-fit of each output projection on the inputs it keeps (local reconstruction): the
    weights W' minimising ||X_K W'^T - X W^T|| over the calibration tokens, from the Gram matrix X^T X."""
    fam = family(model.config)
    _, stack = decoder_stack(model)
    s = sizes(model.config)
    out: dict = {}
    for i in cut.layers:
        for key in ("attn_out", "mlp_out"):
            if key == "mlp_out":
                kept = cut.mlp.get(i)
            else:
                if i not in cut.heads and i not in cut.head_dims:
                    kept = None
                elif fam not in TIED:
                    per_group = s["num_attention_heads"] // s["num_key_value_heads"]
                    heads = [g * per_group + j for g in cut.heads[i] for j in range(per_group)]
                    kept = _head_rows(heads, s["head_dim"])
                else:
                    heads = cut.heads.get(i) or list(range(s["num_attention_heads"]))
                    dims = cut.head_dims.get(i) or [(None, list(range(s["head_dim"])))] * len(heads)
                    kept = [h * s["head_dim"] + d for h, (_, v) in zip(heads, dims) for d in v]
            gram = imp.grams.get((i, key))
            if kept is None or gram is None:
                continue
            module = _modules(fam, stack[i])[key]
            w = module.weight.detach().double().cpu()
            w_t = w if fam == "gpt2" else w.T  # [in, out]: Conv1D stores it so already
            idx = torch.as_tensor(kept)
            g_kk = gram[idx][:, idx]
            lam = ridge * g_kk.diagonal().mean().clamp_min(1e-12)
            solved = torch.linalg.solve(g_kk + lam * torch.eye(len(kept), dtype=g_kk.dtype), gram[idx] @ w_t)
            full = torch.zeros_like(w_t)
            full[idx] = solved
            full = full if fam == "gpt2" else full.T
            out.setdefault(i, {})[REFIT_NAMES[(fam, key)]] = full.to(module.weight.dtype).contiguous()
    return out
