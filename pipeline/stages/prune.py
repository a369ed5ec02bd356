"""Prune: cut the fine-tuned model down by importance, measured on calibration blocks of the training split.

Width (MLP channels, attention heads / KV groups, hidden channels) is ranked by activations (Minitron),
depth by block influence, 1 - cos(layer input, layer output) (ShortGPT). The least important parts go;
with `refit`, each output projection that lost inputs is re-fitted by least squares so the layer's output
on the calibration tokens stays as close as it can to the teacher's. The folder is an ordinary, smaller
model (smaller config, smaller weights); `distill` then heals it against the model it was cut from.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pipeline import data, families, formats, general, models, sparsity, surgery
from pipeline.context import Context, begin
from pipeline.data import DataConfig
from pipeline.errors import StageError
from pipeline.general import OwnText
from pipeline.folders import save_model, staging, write_record
from pipeline.sparsity import SparsitySettings
from pipeline.training import ADDED

log = logging.getLogger("pipeline")
Axis = Literal["mlp", "heads", "hidden", "depth"]
SIZE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
AXIS_KEYS = {"depth": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
             "mlp": "intermediate_size"}


@dataclass
class PruneConfig:
    enabled: bool = False  # run this stage
    input: str = "auto"  # folder to prune; `auto` = the fine-tuned model (or the base model if fine-tuning is off)
    # fraction of the parameters to keep, e.g. 0.8: every dimension in `axes` keeps the same fraction r of its
    # size (widths rounded to `round_to`), r the largest for which the model fits. Counts the transformer body
    # only unless `count_embeddings`; a cut that would drop more than half of the layers is refused (set
    # `num_hidden_layers` to make such a cut on purpose)
    target_params: float | None = None
    # whether `target_params` counts the vocabulary-sized matrices (token embedding, untied LM head) too; they are
    # never cut by `mlp`, `heads` or `depth`, so on a large-vocabulary model (Gemma: 63% of the parameters) a
    # fraction of everything would take far more of the body than it says
    count_embeddings: bool = False
    # what `target_params` shrinks: `mlp` (MLP channels), `heads` (KV groups), `hidden` (embedding channels),
    # `depth` (layers)
    # why: the MLP alone lost the least at equal size (bench/compress.py: width against mix, depth, uniform)
    axes: list[Axis] = field(default_factory=lambda: ["mlp"])
    # or explicit sizes (null = keep): the layers of highest block influence, residual (embedding) channels, query
    # heads, MLP channels of every layer. GPT-2 and GPT-NeoX tie their width to their heads (hidden size = heads ×
    # head size; a GPT-NeoX head keeps its rotary dimensions): a smaller `num_attention_heads` alone also shrinks
    # `hidden_size`; under GQA `num_attention_heads` must be a
    # multiple of the query heads per KV group
    num_hidden_layers: int | None = None
    hidden_size: int | None = None  # ditto
    num_attention_heads: int | None = None  # ditto
    intermediate_size: int | None = None  # ditto
    # `data.block_size` blocks of the training split to measure importance on; SparseGPT's reconstruction gains from
    # more (256 did better than 64 in bench/results/sparsity-sweep/, at twice the prune time)
    calibration_blocks: int = 64
    # text to measure importance on, in the `data` schema (null = the recipe's `data`; the keys it gives replace the
    # recipe's, as in `distill.data`): importance follows its text, so calibrate on what the student must stay
    # good at, e.g. `{mix: [{source: wiki.txt}]}` for general English as well
    data: DataConfig | None = None
    # text the model being cut writes itself, added to the calibration text (the distill stage's own_text of the
    # same model and settings is the same text, written once)
    own_text: OwnText = field(default_factory=OwnText)
    # how MLP channels are ranked: `energy` = E[x²]·‖W_out[:, j]‖² (what channel j adds to the layer output), or
    # `activation` = mean |x| (Minitron)
    mlp_importance: Literal["energy", "activation"] = "energy"
    # least-squares re-fit of the output projections on the channels they keep (lower zero-shot perplexity)
    refit: bool = True
    # `target_params`: widths are multiples of this (a Llama hidden size also of the heads, whose config needs it:
    # of lcm(8, heads) where lcm(round_to, heads) leaves under 8 sizes)
    round_to: int = 32
    batch_size: int = 8  # calibration blocks per forward pass
    # weight sparsity (zeros inside the weights; the shapes stay): alone, or after a structured cut (then on the
    # cut model). Wanda measures its activations on the same calibration blocks
    sparsity: SparsitySettings = field(default_factory=SparsitySettings, metadata=ADDED)

    @property
    def structured(self) -> bool:
        """A cut that changes shapes is asked for (target_params or an explicit size)."""
        return self.target_params is not None or any(getattr(self, k) is not None for k in SIZE_KEYS)

    def check(self) -> list[str]:
        problems = []
        explicit = [k for k in SIZE_KEYS if getattr(self, k) is not None]
        if self.target_params is not None and explicit:
            problems.append(f"target_params: set either target_params or explicit sizes ({', '.join(explicit)}), "
                            "not both")
        if self.enabled and self.target_params is None and not explicit and not self.sparsity.enabled:
            problems.append("target_params: say how small the pruned model should be: target_params (e.g. 0.8), "
                            f"one of {', '.join(SIZE_KEYS)}, or sparsity.amount / sparsity.pattern")
        if self.target_params is not None and not 0 < self.target_params < 1:
            problems.append(f"target_params: {self.target_params} must be a fraction between 0 and 1")
        problems += [f"{k}: {getattr(self, k)} must be at least 1" for k in explicit if getattr(self, k) < 1]
        if not self.axes or len(set(self.axes)) != len(self.axes):
            problems.append(f"axes: {self.axes} must name each of mlp, heads, hidden, depth at most once, and one at least")
        for key in ("calibration_blocks", "round_to", "batch_size"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: {getattr(self, key)} must be at least 1")
        return problems


def targets(cfg: PruneConfig, config) -> dict:
    """The sizes the pruned model gets; StageError naming the key when the model cannot have them."""
    if cfg.target_params is not None:
        return _from_fraction(cfg, config)
    s = surgery.sizes(config)
    problems = []
    wanted = {k: getattr(cfg, k) for k in SIZE_KEYS if getattr(cfg, k) is not None}
    for key, value in wanted.items():
        if s[key] is not None and value > s[key]:  # (None: a size this family's config does not state)
            problems.append(f"prune.{key}: {value} is more than the model has ({s[key]})")
    if any(k != "num_hidden_layers" for k in wanted):
        try:
            surgery.family(config)
        except StageError as err:
            problems.append(str(err).replace("prune: ", "prune.hidden_size/num_attention_heads/intermediate_size: "))
    target = dict(wanted)
    heads = wanted.get("num_attention_heads")
    if problems or surgery.layout(config) is None:
        if heads is not None and surgery.layout(config) is not None and not surgery.tied(config):
            problems += _grouping(heads, s)
        if problems:
            raise StageError("; ".join(problems))
        return target
    if surgery.tied(config):
        # GPT-2 and GPT-NeoX have no head_dim setting: their attention is hidden_size wide, heads of hidden / heads
        heads = heads or s["num_attention_heads"]
        hidden = wanted.get("hidden_size") or heads * s["head_dim"]
        least = max(1, surgery.rotary_dims(config))
        if hidden % heads or not least <= hidden // heads <= s["head_dim"]:
            rotary = f", at least its {least} rotary dimensions" if least > 1 else ""
            raise StageError(f"prune.hidden_size: {families.of(config).name}'s hidden size must be num_attention_heads "
                             f"x head size (at most {s['head_dim']}{rotary}); {hidden} with {heads} heads is not. "
                             f"Use e.g. hidden_size: {heads * min(max(hidden // heads, least), s['head_dim'])}")
        target.update(hidden_size=hidden, num_attention_heads=heads)
    elif heads is not None:
        problems = _grouping(heads, s)
        if problems:
            raise StageError(problems[0])
        target["num_key_value_heads"] = heads // (s["num_attention_heads"] // s["num_key_value_heads"])
    _check_config(config, target)
    return target


def _check_config(config, target: dict) -> None:
    """The config class's own rules (Llama's: hidden size a multiple of the heads), now and not at save time."""
    new = surgery.config_for(config, target)
    if getattr(config, "qk_layernorm", False) and new.hidden_size // new.num_attention_heads != surgery.head_dim(new):
        # Phi's q/k LayerNorms are built hidden_size / heads wide and applied to head_dim-wide heads
        raise StageError(f"prune.hidden_size/num_attention_heads: {config.model_type} with qk_layernorm sizes its q/k "
                         f"norms hidden_size / num_attention_heads, which must stay the head size "
                         f"{surgery.head_dim(new)}; {new.hidden_size} / {new.num_attention_heads} is not. Cut both in "
                         f"proportion, or only intermediate_size / layers")
    try:
        new.validate()
    except Exception as err:  # noqa: BLE001 -- huggingface_hub's strict-dataclass error wraps the config's ValueError
        reason = str(err.__cause__ or err).strip().splitlines()[-1].strip()
        heads = new.num_attention_heads
        hint = (f"; with {heads} heads use e.g. hidden_size: {max(heads, new.hidden_size // heads * heads)}"
                if new.hidden_size % heads else "")
        raise StageError(f"prune.hidden_size/num_attention_heads: {config.model_type} cannot have these sizes: "
                         f"{reason}{hint}") from None


def _grouping(heads: int, s: dict) -> list[str]:
    """Under grouped-query attention a KV group and its query heads go together."""
    per_group = s["num_attention_heads"] // s["num_key_value_heads"]
    if heads % per_group == 0:
        return []
    options = ", ".join(str(per_group * g) for g in range(1, s["num_key_value_heads"] + 1))
    return [f"prune.num_attention_heads: {heads} breaks the KV grouping: the model has {s['num_attention_heads']} "
            f"query heads in {s['num_key_value_heads']} KV groups of {per_group}, and a group goes as a whole; "
            f"use one of {options}"]


def _shrunk(cfg: PruneConfig, config, r: float) -> dict:
    """Every dimension named in `axes` keeps about a fraction r of its size (widths rounded to round_to)."""
    s = surgery.sizes(config)
    target = {}

    def width(n, step=cfg.round_to):
        return max(step, round(n * r / step) * step) if n > step else n

    if "depth" in cfg.axes:
        target["num_hidden_layers"] = max(1, round(s["num_hidden_layers"] * r))
    if "mlp" in cfg.axes:
        target["intermediate_size"] = min(s["intermediate_size"], width(s["intermediate_size"]))
    if surgery.tied(config):  # hidden = heads x head size; a head keeps its rotary dimensions (GPT-NeoX)
        heads = max(1, round(s["num_attention_heads"] * r)) if "heads" in cfg.axes else s["num_attention_heads"]
        least = max(1, surgery.rotary_dims(config))
        dim = max(least, round(s["head_dim"] * r)) if "hidden" in cfg.axes else s["head_dim"]
        target.update(num_attention_heads=heads, hidden_size=heads * dim)
    else:
        if "heads" in cfg.axes:
            groups = max(1, round(s["num_key_value_heads"] * r))
            per_group = s["num_attention_heads"] // s["num_key_value_heads"]
            if config.model_type == "llama" and "hidden" not in cfg.axes:  # hidden_size stays: the heads divide it
                groups = max(g for g in range(1, groups + 1) if s["hidden_size"] % (g * per_group) == 0)
            target.update(num_key_value_heads=groups, num_attention_heads=groups * per_group)
        if "hidden" in cfg.axes:
            step = _hidden_step(cfg, config, s, target)
            target["hidden_size"] = min(s["hidden_size"], width(s["hidden_size"], step))
    return target


def _hidden_step(cfg: PruneConfig, config, s: dict, target: dict) -> int:
    """Hidden widths are multiples of round_to; for Llama, whose config (transformers 5) needs hidden_size to be a
    multiple of the query heads, of lcm(round_to, heads), or of lcm(8, heads) where that leaves fewer than 8
    sizes (SmolLM2: 9 heads, 576 wide)."""
    if config.model_type != "llama":
        return cfg.round_to
    heads = target.get("num_attention_heads", s["num_attention_heads"])
    step = math.lcm(cfg.round_to, heads)
    return step if s["hidden_size"] // step >= 8 else math.lcm(8, heads)


def _from_fraction(cfg: PruneConfig, config) -> dict:
    """The largest r whose `_shrunk` model has at most target_params x the input's parameters (bisection)."""
    if any(a != "depth" for a in cfg.axes):
        try:
            surgery.family(config)
        except StageError as err:
            raise StageError(str(err).replace("prune: ", "prune.axes: ", 1)) from err
    def counted(c) -> int:
        return surgery.count_params(c, embeddings=cfg.count_embeddings)

    budget = cfg.target_params * counted(config)
    lo, hi = 0.0, 1.0
    for _ in range(24):
        mid = (lo + hi) / 2
        if counted(surgery.config_for(config, _shrunk(cfg, config, mid))) <= budget:
            lo = mid
        else:
            hi = mid
    target = _shrunk(cfg, config, lo)
    what = "parameters" if cfg.count_embeddings else "non-embedding parameters"
    if counted(surgery.config_for(config, target)) > budget:
        raise StageError(f"prune.target_params: {cfg.target_params} of the {what} cannot be reached by shrinking "
                         f"{cfg.axes}; add axes (mlp, heads, hidden, depth) or raise target_params")
    layers, kept = config.num_hidden_layers, target.get("num_hidden_layers", config.num_hidden_layers)
    if kept * 2 < layers:  # models are rarely usable before healing with most of their layers gone
        raise StageError(f"prune.target_params: {cfg.target_params} of the {what} would remove {layers - kept} of the "
                         f"model's {layers} layers, more than half, which leaves it unusable before healing. Keep "
                         "more (raise target_params), shrink widths too (axes: [depth, mlp]), or set "
                         "prune.num_hidden_layers to make this cut on purpose")
    _check_config(config, target)
    return target


def run(cfg: PruneConfig, ctx: Context) -> Path:
    from transformers import set_seed

    stage = begin(ctx, "prune", cfg)
    if stage is None:
        return ctx.run_dir / "prune"
    set_seed(ctx.seed)
    model, tokenizer = formats.load_folder(ctx.inputs["prune"], dtype=torch.float32)
    before = surgery.sizes(model.config)
    target = targets(cfg, model.config)
    text = general.with_own_text(cfg.data or ctx.data, cfg.own_text, model, tokenizer, ctx.inputs["prune"],
                                 ctx.run_dir, ctx.seed)
    blocks = data.calibration_blocks(text, tokenizer, ctx.seed, cfg.calibration_blocks, "prune.calibration_blocks")
    # (a size a family's config does not state, e.g. Falcon's MLP width, reads None and is never cut)
    width = any(target.get(k) is not None and target[k] != before[k] for k in SIZE_KEYS if k != "num_hidden_layers")
    imp, cut = None, None
    if cfg.structured:
        log.info("prune: measuring importance on %d calibration blocks (%d tokens)", len(blocks), blocks.numel())
        imp = surgery.measure(model, blocks, cfg.batch_size, width=width, grams=cfg.refit and width,
                              mlp_importance=cfg.mlp_importance)
        cut = surgery.plan(model, imp, target, refit=cfg.refit and width)
        student = surgery.apply(model, cut)
    else:
        student = model
    sparse = _sparsify(cfg.sparsity, student, blocks, cfg.batch_size) if cfg.sparsity.enabled else None
    after = surgery.sizes(student.config)
    params, t_params = models.count_params(student), models.count_params(model)
    # the body: what target_params counts by default (the vocabulary-sized matrices left out)
    body, t_body = (surgery.count_params(m.config, embeddings=False) for m in (student, model))
    if cfg.structured:
        log.info("prune: %s → %s, %s → %s parameters (%.1f%%; %.1f%% of the non-embedding ones)",
                 _changed(before, after, True), _changed(before, after, False), f"{t_params:,}", f"{params:,}",
                 100 * params / t_params, 100 * body / t_body)
    kept = None if cut is None else {
        "layers": cut.layers, "hidden": cut.hidden, "mlp": {str(k): v for k, v in cut.mlp.items()},
        "heads": {str(k): v for k, v in cut.heads.items()},
        "head_dims": {str(k): v for k, v in cut.head_dims.items()}}
    metrics = {"params": params, "teacher_params": t_params, "params_ratio": round(params / t_params, 4),
               "body_params": body, "teacher_body_params": t_body, "body_ratio": round(body / t_body, 4)}
    with staging(stage.out) as tmp:
        save_model(tmp, student, tokenizer)
        if sparse is not None:
            sparse.update(sparsity.finish(tmp, student, tokenizer, cfg.sparsity.write_compressed))
            metrics.update(sparsity=sparse["sparsity"], nonzero_params=params - sparse["zeros"])
        write_record(tmp, stage.record(
            ctx,
            metrics=metrics,
            sizes={"before": before, "after": after},
            calibration={"split": "train", "text": text.label, "mix": [m.source for m in text.mix],
                         "blocks": len(blocks), "tokens": int(blocks.numel())},
            importance=imp.summary() if imp is not None else None,
            kept=kept,
            sparsity=sparse,
            tags=["pruning"] + (["sparse"] if sparse is not None else []),
            summary=_summary(cfg, ctx, before, after, params, t_params, body, t_body, blocks, text, width, sparse),
        ))
    return stage.out


def _sparsify(settings: SparsitySettings, model, blocks: torch.Tensor, batch_size: int) -> dict:
    """Zero the least important block weights in place; what the record says about it (before the sizes)."""
    norms = None
    if settings.method == "sparsegpt":
        log.info("prune: SparseGPT, layer by layer, on %d calibration blocks", len(blocks))
        sparsity.sparsegpt(model, settings, blocks, batch_size)
    else:
        if settings.method == "wanda":
            log.info("prune: measuring Wanda activation norms on %d calibration blocks", len(blocks))
            norms = sparsity.input_norms(model, blocks, batch_size)
        sparsity.apply(model, sparsity.masks(model, settings, norms))
    measured = sparsity.measure(model)
    log.info("prune: %s sparsity (%s, %s): %.1f%% of the block linear weights are zero", settings.pattern,
             settings.method, settings.scope, 100 * measured["sparsity"])
    return {"target": settings.target, "pattern": settings.pattern, "method": settings.method,
            "scope": settings.scope}


def _summary(cfg: PruneConfig, ctx: Context, before, after, params, t_params, body, t_body, blocks, text, width,
             sparse) -> str:
    source = (f"the training split of {text.label}" + "".join(f" + {m.source}" for m in text.mix))
    parts = []
    if cfg.structured:
        parts.append(
            f"Pruned from `{ctx.inputs['prune']}` ({t_params:,} → {params:,} parameters, "
            f"{params / t_params:.0%}; {body / t_body:.0%} of the non-embedding ones): "
            f"{_changed(before, after, True)} → {_changed(before, after, False)}. "
            f"Importance from activations on {blocks.numel():,} calibration tokens of {source} "
            f"(layers by block influence, MLP channels by {cfg.mlp_importance}, heads and hidden channels by "
            f"activation magnitude)" + ("; output projections re-fitted by least squares." if cfg.refit and width
                                        else "."))
    if sparse is not None:
        how = {"wanda": "|W| x activation norm (Wanda)", "magnitude": "|W| (magnitude)",
               "sparsegpt": "SparseGPT (OBS saliency, kept weights re-fitted layer by layer)"}[sparse["method"]]
        made = "Then made it" if cfg.structured else f"Made `{ctx.inputs['prune']}`"
        parts.append(
            f"{made} sparse: {sparse['pattern']} by {how}, {sparse['scope'].replace('_', ' ')}"
            + (f", on {blocks.numel():,} calibration tokens of {source}" if sparse["method"] != "magnitude" else "")
            + ". " + sparsity.describe(sparse))
    parts.append("Distill it against the model it was cut from to recover quality"
                 + (" (the zeros stay fixed while it trains)." if sparse is not None else "."))
    return " ".join(parts)


def _changed(before: dict, after: dict, old: bool) -> str:
    keys = [k for k in before if before[k] != after[k]] or ["num_hidden_layers"]
    return ", ".join(f"{k} {before[k] if old else after[k]}" for k in keys)
