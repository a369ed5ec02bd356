"""Weight sparsity: unstructured and N:M (2:4) masks on the linear weights of the transformer blocks, kept fixed
while training, grown by an L1 (proximal) penalty, and written in a bitmask form (Deep Compression's storage).

The zeros in the weights are the mask: a sparse model is an ordinary model folder whose block weights hold
exact zeros, so every stage, format and runtime reads it; the prune stage records how sparse it made each layer,
and fine-tune / distill re-zero the masked weights after every optimizer step when their input is sparse.
Embeddings and the LM head stay dense (they are shared with the input and sparsifying them costs the most).

Importance: `magnitude` = |W|; `wanda` = |W| x ||X_j||_2, the input channel's activation norm over the
calibration tokens (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"), compared within each
output row as the paper does; `sparsegpt` = SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot"): layer by layer, OBS saliency w^2 / [H^-1]_jj^2 with the damped
Hessian H = X^T X of the layer's inputs, and the kept weights updated to reconstruct the layer's output.
llm-compressor (which has Wanda and SparseGPT) needs transformers >= 5.15, neural-compressor 3.x dropped its
pruners, sparseml 1.9 is an empty deprecated package, and compressed-tensors 0.20 dropped its sparse-bitmask
compressor, so the rules and the form are written here.

What sparsity buys: on disk, the bitmask form stores one bit per weight plus the kept values; in time, only
runtimes with sparse kernels gain (docs/reference.md, "Sparsity").
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import TrainerCallback

from pipeline.errors import StageError
from pipeline.surgery import decoder_stack, run_hooked

log = logging.getLogger("pipeline")
COMPRESSED_DIR = "compressed"  # the bitmask form, inside the stage folder
BITMASK_FILE = "model.bitmask.safetensors"
FORMAT = "llm-pipeline-bitmask-v1"
_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass
class SparsitySettings:
    # fraction of the transformer blocks' linear weights set to exactly zero, in [0, 1); 0 = no sparsity. The
    # embeddings and the LM head stay dense. With an N:M pattern leave it 0 (the pattern sets it: 2:4 = 0.5)
    amount: float = 0.0
    # `unstructured` (any weight may go) or `N:M`, e.g. `2:4`: N of every M consecutive weights along the input
    # dimension are kept (2:4 is what NVIDIA's sparse tensor cores run). Unquoted, YAML reads 2:4 as the
    # base-60 number 124; that is read back as 2:4
    pattern: str | int = "unstructured"
    # `wanda` = |W| x the input channel's activation norm on the calibration blocks (Wanda), `magnitude` = |W|,
    # `sparsegpt` = SparseGPT: layer by layer, drops the weights of least OBS saliency and updates the kept ones
    # to reconstruct the layer's output on the calibration blocks (damped Hessian of its inputs; slower)
    method: Literal["wanda", "magnitude", "sparsegpt"] = "wanda"
    # `per_layer`: every linear weight gets `amount` zeros (Wanda: every output row of it); `global`: one
    # threshold over all of them, so some layers end sparser than others (unstructured only)
    scope: Literal["per_layer", "global"] = "per_layer"
    # also write the bitmask form (one bit per weight + the kept values; reloads bit-exactly) in `compressed/`
    # of the stage folder; the record gives the size of every form either way
    write_compressed: bool = True

    def __post_init__(self):
        if isinstance(self.pattern, int) and not isinstance(self.pattern, bool) and self.pattern >= 0:
            self.pattern = f"{self.pattern // 60}:{self.pattern % 60}"  # YAML 1.1's sexagesimal 2:4 = 124

    @property
    def nm(self) -> tuple[int, int] | None:
        match = _NM.match(str(self.pattern))
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def enabled(self) -> bool:
        return self.amount > 0 or self.nm is not None

    @property
    def target(self) -> float:
        """The fraction of zeros asked for."""
        nm = self.nm
        return (nm[1] - nm[0]) / nm[1] if nm else self.amount

    def check(self) -> list[str]:
        problems = []
        if not 0 <= self.amount < 1:
            problems.append(f"amount: {self.amount} must be a fraction of zeros in [0, 1), e.g. 0.5")
        nm = self.nm
        if self.pattern != "unstructured" and nm is None:
            problems.append(f"pattern: '{self.pattern}' is not allowed; use unstructured or N:M, e.g. 2:4")
        if nm is not None:
            n, m = nm
            if not 0 < n < m:
                problems.append(f"pattern: {self.pattern} must keep N of M weights with 0 < N < M, e.g. 2:4")
            elif self.amount and abs(self.amount - (m - n) / m) > 1e-9:
                problems.append(f"amount: {self.amount} contradicts pattern {self.pattern}, which makes "
                                f"{(m - n) / m:g} of the weights zero; leave amount at 0 with an N:M pattern")
            if self.scope == "global":
                problems.append(f"scope: global ranks all layers together, but {self.pattern} keeps N of every "
                                "M weights in each group; use scope: per_layer")
        if self.method == "sparsegpt" and self.scope == "global" and nm is None:
            problems.append("scope: global ranks all layers together, but sparsegpt prunes and reconstructs one "
                            "layer at a time; use scope: per_layer")
        return problems


def block_linears(model) -> dict[str, tuple[torch.nn.Module, int]]:
    """The 2-D weights of the decoder layers' linear layers: name -> (module, the weight's input dimension).
    GPT-2's Conv1D stores [in, out] (input dim 0), nn.Linear [out, in] (input dim 1)."""
    prefix, stack = decoder_stack(model)
    out = {}
    for name, module in stack.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and "norm" not in type(module).__name__.lower():
            if isinstance(module, torch.nn.Linear):
                out[f"{prefix}.{name}"] = (module, 1)
            elif type(module).__name__ == "Conv1D":
                out[f"{prefix}.{name}"] = (module, 0)
    return out


@torch.no_grad()
def input_norms(model, blocks: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """||X_j||_2 over the calibration tokens for each input channel j of every block linear (Wanda's factor)."""
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, (module, _) in block_linears(model).items():
        def hook(mod, args, name=name):
            x = args[0].detach().float()
            s = x.reshape(-1, x.shape[-1]).pow(2).sum(0).double().cpu()
            sums[name] = sums[name] + s if name in sums else s
        hooks.append(module.register_forward_pre_hook(hook))
    run_hooked(model, blocks, batch_size, device, hooks)
    return {k: v.sqrt() for k, v in sums.items()}


def _rows_last(weight: torch.Tensor, in_dim: int) -> torch.Tensor:
    """The weight as [out, in] (a view of Conv1D's [in, out] transposed)."""
    return weight if in_dim == 1 else weight.T


def scores(model, norms: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Importance of every block weight, as [out, in]: |W|, times the input channel's norm for Wanda."""
    out = {}
    for name, (module, in_dim) in block_linears(model).items():
        s = _rows_last(module.weight.detach(), in_dim).abs().double().cpu()
        if norms is not None:
            if name not in norms:
                raise StageError(f"prune.sparsity: no calibration activations reached {name}")
            s = s * norms[name].unsqueeze(0)
        out[name] = s
    return out


class _Caught(Exception):
    """Raised by the hook that catches the first decoder layer's inputs: the rest of the forward is not needed."""


def _layer_inputs(model, blocks: torch.Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
    """The first decoder layer's (args, kwargs) for each calibration batch: hidden states plus what every layer
    is called with (attention mask, position embeddings), so the layers can then be run one at a time."""
    _, stack = decoder_stack(model)
    device = next(model.parameters()).device
    caught: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        caught.append((args, kwargs))
        raise _Caught

    hook = stack[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(blocks), batch_size):
            try:
                model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        hook.remove()
    return caught


def _call_layer(layer, args: tuple, kwargs: dict, hidden: torch.Tensor) -> torch.Tensor:
    """The layer's output hidden states for `hidden` in place of the caught ones."""
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, amount: float, nm: tuple[int, int] | None,
                    damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """SparseGPT's rule (Frantar & Alistarh 2023) for one weight [out, in] and H = X^T X of its inputs [in, in]:
    columns are visited left to right; in each block of `block` columns the weights with the smallest
    w^2 / [H^-1]_jj^2 (the OBS saliency) go (`amount` of the block, or N:M per group of M inputs), and the error of
    each removed or kept column is spread onto the columns not yet visited through the Cholesky factor of the
    damped inverse Hessian, so the layer's output on the calibration inputs is reconstructed. Returns the new
    weight (float32, exact zeros where pruned)."""
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)
    h = hessian.double().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    mean_diag = torch.diag(h).mean()
    for attempt in range(4):  # a Hessian from few tokens may need more damping to be positive definite
        damped = h + (damp * 10 ** attempt) * mean_diag * torch.eye(cols, dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if not info:
            break
    else:
        raise StageError("prune.sparsity: sparsegpt: the inputs' Hessian is not positive definite even damped")
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()
    pruned = torch.zeros_like(w, dtype=torch.bool)
    total_drop, done = amount * rows * cols, 0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(h1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:  # this block's share of the layer's zeros, rounded so that the layer's total is exact
            drop = int(round(total_drop * i2 / cols)) - done
            done += drop
            if drop:
                saliency = (w1 ** 2 / d1.unsqueeze(0) ** 2).flatten()
                mask1.view(-1)[saliency.argsort(stable=True)[:drop]] = True
        n, m = nm or (0, 0)
        for i in range(count):
            col = w1[:, i]
            if nm is not None and i % m == 0:
                saliency = w1[:, i:i + m] ** 2 / d1[i:i + m].unsqueeze(0) ** 2
                mask1.scatter_(1, i + saliency.topk(m - n, dim=1, largest=False).indices, True)
            q = col.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            e = (col - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w[pruned] = 0.0  # +0.0 exactly (a kept weight may also have come out as zero: it stays in the mask)
    return w


@torch.no_grad()
def sparsegpt(model, settings: SparsitySettings, blocks: torch.Tensor, batch_size: int = 8,
              damp: float = 0.01) -> dict[str, torch.Tensor]:
    """Prune every block linear by SparseGPT, in place, layer after layer: each decoder layer's linears are
    reconstructed on the inputs that the already-pruned layers before it produce (the paper's sequential
    procedure), then the layer is run again to give the next one its inputs. Returns the keep-masks."""
    model.eval()
    prefix, stack = decoder_stack(model)
    linears = block_linears(model)
    caught = _layer_inputs(model, blocks, batch_size)
    hidden = [args[0] if args else kwargs["hidden_states"] for args, kwargs in caught]
    keep: dict[str, torch.Tensor] = {}
    nm = settings.nm
    for i, layer in enumerate(stack):
        mine = {name: lin for name, lin in linears.items() if name.startswith(f"{prefix}.{i}.")}
        grams: dict[str, torch.Tensor] = {}
        hooks = []
        for name, (module, _) in mine.items():
            def hook(mod, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                g = x.T @ x
                grams[name] = grams[name] + g if name in grams else g
            hooks.append(module.register_forward_pre_hook(hook))
        try:
            for (args, kwargs), x in zip(caught, hidden):
                _call_layer(layer, args, kwargs, x)
        finally:
            for h in hooks:
                h.remove()
        for name, (module, in_dim) in mine.items():
            if name not in grams:
                raise StageError(f"prune.sparsity: no calibration activations reached {name}")
            weight = module.weight
            new = sparsegpt_prune(_rows_last(weight.detach(), in_dim), grams.pop(name), settings.amount, nm, damp)
            new = new if in_dim == 1 else new.T
            weight.data.copy_(new.to(weight.dtype))
            keep[name] = nonzero(weight.data).to(weight.device)
        hidden = [_call_layer(layer, args, kwargs, x) for (args, kwargs), x in zip(caught, hidden)]
    return keep


def row_keep(scores: torch.Tensor, settings: SparsitySettings) -> torch.Tensor:
    """Bool keep-mask of a [rows, inputs] score matrix compared within each row: N of every M consecutive scores
    with an N:M pattern, else all but the lowest `amount` of the row; ties broken by position."""
    if settings.nm is not None:
        n, m = settings.nm
        groups = scores.reshape(scores.shape[0], -1, m)
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices,
                                                                    True).reshape(scores.shape)
    drop = int(round(settings.amount * scores.shape[1]))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        keep.scatter_(1, scores.argsort(dim=1, stable=True)[:, :drop], False)
    return keep


def masks(model, settings: SparsitySettings, norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """name -> bool keep-mask shaped like the module's weight; ties broken by position (deterministic)."""
    imp = scores(model, norms if settings.method == "wanda" else None)
    layout = {name: in_dim for name, (_, in_dim) in block_linears(model).items()}
    keep: dict[str, torch.Tensor] = {}
    nm = settings.nm
    if nm is not None:
        for name, s in imp.items():
            if s.shape[1] % nm[1]:
                raise StageError(f"prune.sparsity.pattern: {settings.pattern} needs input widths that are multiples "
                                 f"of {nm[1]}; {name} has {s.shape[1]} inputs")
            keep[name] = row_keep(s, settings)
    elif settings.scope == "global":
        flat = torch.cat([s.flatten() for s in imp.values()])
        drop = int(round(settings.amount * flat.numel()))
        chosen = torch.ones(flat.numel(), dtype=torch.bool)
        if drop:
            chosen[flat.argsort(stable=True)[:drop]] = False
        start = 0
        for name, s in imp.items():
            keep[name] = chosen[start:start + s.numel()].reshape(s.shape)
            start += s.numel()
    else:
        for name, s in imp.items():
            # Wanda compares weights within each output row; magnitude within the whole matrix
            keep[name] = row_keep(s if settings.method == "wanda" else s.reshape(1, -1), settings).reshape(s.shape)
    return {name: k if layout[name] == 1 else k.T.contiguous() for name, k in keep.items()}


@torch.no_grad()
def apply(model, keep: dict[str, torch.Tensor]) -> None:
    """Zero the weights outside the masks (+0.0, so the bitmask form stores no value for them)."""
    modules = block_linears(model)
    for name, k in keep.items():
        w = modules[name][0].weight
        w.data.masked_fill_(~k.to(w.device), 0.0)


def nonzero(t: torch.Tensor) -> torch.Tensor:
    """Where the bit pattern is not +0.0 (a -0.0 counts as a value, so the bitmask form stays bit-exact)."""
    t = t.detach().cpu().contiguous()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(ints) != 0


def from_zeros(model) -> dict[str, torch.Tensor]:
    """The keep-masks a sparse model carries: its non-zero block weights."""
    return {name: m.weight.detach() != 0 for name, (m, _) in block_linears(model).items()}


def measure(model) -> dict:
    """Fraction of exact zeros: overall (`sparsity`) and per block linear (`layers`)."""
    layers, zeros, total = {}, 0, 0
    for name, (module, _) in block_linears(model).items():
        w = module.weight.detach()
        z = int((w == 0).sum())
        layers[name] = round(z / w.numel(), 4)
        zeros, total = zeros + z, total + w.numel()
    return {"sparsity": round(zeros / total, 4) if total else 0.0, "zeros": zeros, "weights": total,
            "layers": layers}


def fits_pattern(weight: torch.Tensor, keep_nm: tuple[int, int], in_dim: int = 1) -> bool:
    """Every group of M consecutive inputs of `weight` has at least M - N zeros (False when its input width is no
    multiple of M)."""
    n, m = keep_nm
    w = _rows_last(weight.detach(), in_dim)
    return w.shape[1] % m == 0 and not ((w != 0).reshape(w.shape[0], -1, m).sum(-1) > n).any()


def check_pattern(model, keep_nm: tuple[int, int]) -> bool:
    """Every block weight fits the N:M pattern (`fits_pattern`)."""
    return all(fits_pattern(module.weight, keep_nm, in_dim) for module, in_dim in block_linears(model).values())


def record_of(folder: Path) -> dict | None:
    """The `sparsity` a stage folder's record carries (its input was made sparse), else None."""
    from pipeline.records import read_record

    try:
        rec = read_record(folder)
    except Exception:  # noqa: BLE001 -- a folder without a readable record is simply not known to be sparse
        return None
    return (rec.details or {}).get("sparsity") if rec is not None else None


class KeepMask(TrainerCallback):
    """A Trainer callback: masked weights stay exactly zero after every optimizer step, and with `l1` > 0 every
    block weight is soft-thresholded by lr x l1 after the step (the proximal step of an L1 penalty, which, unlike
    a loss term under Adam, drives weights to exact zeros). Masks are the input's zeros (`keep`), or None."""

    def __init__(self, model, keep: dict[str, torch.Tensor] | None, l1: float = 0.0):
        modules = block_linears(model)
        self.weights = {name: m.weight for name, (m, _) in modules.items()}
        self.keep = dict(keep or {})
        self.l1 = l1

    @torch.no_grad()
    def enforce(self, lr: float = 0.0) -> None:
        if self.l1 > 0 and lr > 0:
            step = lr * self.l1
            for w in self.weights.values():
                w.data.copy_(torch.sign(w.data) * (w.data.abs() - step).clamp_min(0))
                w.data.masked_fill_(w.data == 0, 0.0)  # -0.0 from sign() * 0 is +0.0 now
        for name, k in self.keep.items():
            w = self.weights[name]
            if k.device != w.device:  # the Trainer moved the model after the masks were taken
                self.keep[name] = k = k.to(w.device)
            w.data.masked_fill_(~k, 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.enforce()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None and optimizer.param_groups else 0.0
        self.enforce(lr)

    def on_train_end(self, args, state, control, **kwargs):  # the best checkpoint, reloaded: masked too
        self.enforce()


# --- the bitmask form and the size of each form -----------------------------------------------------------


def _pack(keep: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(keep.flatten().numpy().astype(np.uint8)))


def _unpack(bits: torch.Tensor, shape) -> torch.Tensor:
    count = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(bits.numpy())[:count].astype(bool)).reshape(tuple(shape))


def bitmask_state(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict with every block weight W as `W.bitmask` (1 bit a weight, packed), `W.values` (the
    non-zero values in row-major order) and `W.shape`; the other tensors as they are. Tied weights once."""
    sparse = {f"{name}.weight" for name in block_linears(model)}
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        if t.data_ptr() in seen and t.numel():
            tied[key] = seen[t.data_ptr()]
            continue
        seen[t.data_ptr()] = key
        if key in sparse:
            keep = nonzero(t)
            out[f"{key}.bitmask"] = _pack(keep)
            out[f"{key}.values"] = t.flatten()[keep.flatten()].clone()
            out[f"{key}.shape"] = torch.tensor(t.shape, dtype=torch.int64)
        else:
            out[key] = t.clone()
    return out, tied


def dense_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Back from `bitmask_state`: the block weights rebuilt, bit for bit."""
    out = {}
    for key, t in tensors.items():
        if key.endswith((".values", ".shape")):
            continue
        if key.endswith(".bitmask"):
            base = key.removesuffix(".bitmask")
            values, shape = tensors[f"{base}.values"], tensors[f"{base}.shape"].tolist()
            keep = _unpack(t, shape)
            dense = torch.zeros(shape, dtype=values.dtype)
            dense[keep] = values
            out[base] = dense
        else:
            out[key] = t
    return out


def save_bitmask(model, tokenizer, folder: Path) -> Path:
    """The bitmask form in `folder`: config, tokenizer and `model.bitmask.safetensors`; `load_bitmask` reads it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors, tied = bitmask_state(model)
    save_file(tensors, str(folder / BITMASK_FILE), metadata={"format": FORMAT, "tied": json.dumps(tied)})
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder / BITMASK_FILE


def load_bitmask(folder: Path):
    """The model a `save_bitmask` folder holds, as an ordinary transformers model (dense in memory)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(folder) / BITMASK_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise StageError(f"{path} is not an {FORMAT} file")
    state = dense_state(load_file(str(path)))
    for key, source in json.loads(meta.get("tied", "{}")).items():
        state[key] = state[source]
    config = AutoConfig.from_pretrained(folder)
    dtype = next(iter(state.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StageError(f"{path}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval()


def codec() -> tuple[str, callable]:
    """zstd (level 10, the `zstandard` package) when installed, else zlib (level 6, stdlib): the entropy coder
    whose size the record reports. Python has no zstd in the standard library before 3.14."""
    try:
        import zstandard

        return "zstd", zstandard.ZstdCompressor(level=10).compress
    except ImportError:
        return "zlib", lambda b: zlib.compress(b, 6)


def _bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per row (so zero stays zero)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return (x / scale).round().clamp(-127, 127).to(torch.int8), scale.reshape(-1).clone()


def _int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deep Compression's quantization step, for sizes only: every 2-D weight (the block linears, the embeddings
    and an untied LM head, as an int8 model such as openvino-int8 stores them) as int8 with one fp32 scale per
    row; a bitmask form keeps its bitmask and stores the int8 values of the kept weights (scales from the same
    rows as the dense form's, so the two differ only by the zeros)."""
    out = {}
    for key, t in tensors.items():
        if key.endswith((".values", ".shape")):
            continue
        if key.endswith(".bitmask"):
            base = key.removesuffix(".bitmask")
            shape = tensors[f"{base}.shape"].tolist()
            keep = _unpack(t, shape)
            dense = torch.zeros(shape, dtype=torch.float32)
            dense[keep] = tensors[f"{base}.values"].float()
            rows = dense if len(shape) == 2 else dense.reshape(shape[0], -1)
            q, scale = _rows_int8(rows)
            out[key] = t
            out[f"{base}.values"] = q.reshape(shape)[keep].clone()
            out[f"{base}.shape"] = tensors[f"{base}.shape"]
            out[f"{base}.scale"] = scale
        elif t.dim() == 2 and t.is_floating_point():
            out[key], out[f"{key}.scale"] = _rows_int8(t)
        else:
            out[key] = t
    return out


def _entropy_bits(symbols: torch.Tensor, count: int) -> float:
    """What an ideal order-0 coder needs for these symbols (small non-negative integers), in bits: each symbol
    costs -log2 of its frequency in the tensor."""
    c = torch.bincount(symbols.flatten().long(), minlength=count).double()
    c = c[c > 0]
    return float(-(c * (c / c.sum()).log2()).sum())


def entropy_bound(tensors: dict[str, torch.Tensor], code=None) -> int:
    """Bytes an int8 form (`_int8`'s output) needs when its int8 values and masks are coded by an ideal order-0
    entropy coder, tensor by tensor: int8 values by their histogram; a bitmask by the histogram of its 4-weight
    patterns along each stored row (a random 50% mask costs 1 bit a weight, a 2:4 mask along the rows
    log2(6) / 4 = 0.65). The rest (scales, norms, biases, shapes) as `code` packs them (e.g. the codec; None: as
    stored). What a coder of these symbols cannot beat: at 50% zeros the mask alone costs as much as an eighth
    of the dense int8 values."""
    bits, rest = 0.0, {}
    for key, t in tensors.items():
        if key.endswith(".bitmask"):  # each packed byte's two nibbles are two 4-weight patterns, in order
            count = int(np.prod(tensors[f"{key.removesuffix('.bitmask')}.shape"].tolist()))
            bits += _entropy_bits(torch.stack([t >> 4, t & 15], -1).flatten()[: -(-count // 4)], 16)
        elif t.dtype == torch.int8:
            bits += _entropy_bits(t.to(torch.int16) + 128, 256)
        else:
            rest[key] = t
    stored = sum(t.numel() * t.element_size() for t in rest.values())
    return math.ceil(bits / 8) + (stored if code is None or not rest else min(stored, len(code(_bytes(rest)))))


def forms(model) -> dict:
    """The size in bytes of each on-disk form of the weights (safetensors as written, without the tokenizer):
    dense, bitmask, and each entropy-coded; then their int8 versions (every 2-D weight int8, the norms and biases
    as stored), the Deep Compression sequence: prune, quantize, entropy-code; and for each int8 form the order-0
    entropy bound (`entropy_bound`) its coded size is to be read against."""
    name, compress = codec()
    dense = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    seen, unique = set(), {}
    for k, v in dense.items():  # tied weights are written once, as save_pretrained does
        if v.data_ptr() not in seen or not v.numel():
            seen.add(v.data_ptr())
            unique[k] = v
    bitmask, _ = bitmask_state(model)
    out = {"codec": name}
    for label, tensors in (("dense", unique), ("bitmask", bitmask)):
        raw = _bytes(tensors)
        out[label] = len(raw)
        out[f"{label}_{name}"] = len(compress(raw))
        quantized = _int8(tensors)
        q = _bytes(quantized)
        out[f"{label}_int8"] = len(q)
        out[f"{label}_int8_{name}"] = len(compress(q))
        out[f"{label}_int8_bound"] = entropy_bound(quantized, compress)
    return out


def finish(folder: Path, model, tokenizer, write: bool) -> dict:
    """What a stage that writes a sparse model adds to its record: the measured sparsity per layer and the size
    of every form; with `write`, the bitmask form in folder/compressed/ (checked to reload bit-exactly)."""
    details = measure(model)
    details["forms"] = forms(model)
    if write:
        target = folder / COMPRESSED_DIR
        shutil.rmtree(target, ignore_errors=True)
        path = save_bitmask(model, tokenizer, target)
        details["forms"]["bitmask_file"] = path.stat().st_size
        details["compressed"] = {"folder": COMPRESSED_DIR, "format": FORMAT, "file": BITMASK_FILE}
    return details


def trained_record(folder: Path, model, tokenizer, source: Path, l1: float) -> dict:
    """The `sparsity` of a model trained on a fixed mask or with an L1 penalty: the input's settings, the sparsity
    now, and the size of each form (the bitmask form written when the input had one, or for an L1 run)."""
    given = record_of(source) or {}
    details = {k: given[k] for k in ("target", "pattern", "method", "scope") if k in given}
    details.update(mask="fixed" if given else "none", l1=l1, input_sparsity=given.get("sparsity"))
    details.update(finish(folder, model, tokenizer, write="compressed" in given or not given))
    return details


def training_note(details: dict) -> str:
    how = []
    if details.get("mask") == "fixed":
        how.append(f"trained on the input's fixed mask ({details['input_sparsity']:.1%} zeros stayed zero)")
    if details.get("l1"):
        how.append(f"L1 penalty {details['l1']:g} (proximal step)")
    return f"Sparse: {' and '.join(how)}. " + describe(details)


def describe(details: dict) -> str:
    f = details.get("forms", {})
    codec_name = f.get("codec", "zstd")
    mb = 1e6
    if not f:
        return f"{details['sparsity']:.1%} of the block linear weights are zero."
    return (f"{details['sparsity']:.1%} of the block linear weights are zero. Sizes: dense {f['dense'] / mb:.1f} MB, "
            f"bitmask {f['bitmask'] / mb:.1f} MB, bitmask + {codec_name} {f[f'bitmask_{codec_name}'] / mb:.1f} MB; "
            f"int8: dense + {codec_name} {f[f'dense_int8_{codec_name}'] / mb:.1f} MB, bitmask + {codec_name} "
            f"{f[f'bitmask_int8_{codec_name}'] / mb:.1f} MB"
            + (f" (order-0 entropy bounds: {f['dense_int8_bound'] / mb:.1f} and {f['bitmask_int8_bound'] / mb:.1f} MB)"
               if "bitmask_int8_bound" in f else "") + ".")
