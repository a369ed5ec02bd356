"""Keys that would not take effect: the table of every recipe key that another key (or the machine) makes
meaningless, checked with the recipe, so that nothing the user set is silently ignored.

A key counts only when the recipe (or an override) gives it a value other than its default: a key left at its
default contradicts nothing. Each row names the keys it concerns, when they have no effect and why (which other
key, with its value), and the fix; `recipe.load` reports every row that applies, with the recipe's other problems.

Accepted on purpose, so not in the table: the settings of a feature the recipe switches off with its own switch
(`<stage>.enabled: false`, `evaluate.speed` / `samples` / `answers` / `task.enabled: false`,
`finetune.qat.enabled: false`, `general.tokens: 0`) are kept for when it is switched on again: the switch says
plainly that they are off, and switching a feature off over a recipe that configures it is what overrides are
for. A switch that is off only by default (`prune.enabled`, `finetune.qat.enabled`) says nothing, so settings
under it are refused unless the switch is written. Other value contradictions live in each section's `check`
(`distill.every` with `keep`, `quantize.input` with `inputs`, a candidate option of another method, ...).
Examined and left out because both keys take effect: `logging_steps` past `max_steps` (the Trainer logs the mean
training loss at the end all the same, and a smoke override such as `finetune.max_steps=2` must not be refused),
`backup_precision` with `ratio` 1 (NNCF keeps the embeddings and the last layer in it), `distill.teacher` for a
student cut from the teacher's layers (it is their source), `lm_eval_batch_size` (the offline task uses it too).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.columns import local_files
from pipeline.quant_backends import DATA_AWARE

OFF = ("enabled",)  # switch keys: written as false, they keep their section's settings for later


@dataclass(frozen=True)
class Rule:
    where: str  # the settings the keys belong to: a section path, `data*` (every data section) or `*.mix[]` items
    keys: tuple[str, ...]  # their names there (a settings group stands for every key in it); ("*",) = all
    # (recipe, settings) -> the reason the keys have no effect, naming the other key and its value; None: they do
    when: Callable
    fix: str  # what to do instead; `{p}` is the settings' path
    on: tuple[str, ...] = ()  # the keys `when` reads ({p}-relative): a wrong value there is reported as that
    # the key ({p}-relative, or a full path) that switches the settings on: written as off, the rule is quiet
    switch: str | None = None


def _local(source: str) -> str | None:
    if source == "stdlib":
        return "stdlib, the offline corpus"
    return "local data" if local_files(source) is not None else None


def pruned_input(r, d) -> str | None:
    """Why distill's student is the pruned model (so every/keep/layers/config cannot choose it), or None."""
    if r.prune.enabled and d.input == "auto":
        return "prune.enabled is true: the student is the pruned model"
    if d.input != "auto":
        from pipeline.records import read_record

        try:
            record = read_record(Path(d.input))
        except Exception:  # noqa: BLE001 -- a damaged record is the stage's to report, when it reads the folder
            record = None
        if record is not None and record.stage == "prune":
            return f"distill.input '{d.input}' is a pruned model (its pipeline.json says so), which is the student"
    return None


def _cuts_mlp(p) -> bool:
    return (p.target_params is not None and "mlp" in p.axes) or p.intermediate_size is not None


def _cuts_width(p) -> bool:
    return ((p.target_params is not None and bool(set(p.axes) - {"depth"}))
            or any(getattr(p, k) is not None for k in ("hidden_size", "num_attention_heads", "intermediate_size")))


def _cpu_fp16(o) -> str | None:
    if o.precision != "fp16":
        return None
    from pipeline.models import pick_device

    if pick_device().type != "cpu":
        return None
    return ("this machine trains on the CPU, where accelerate autocasts to bf16 only: fp16 would train in fp32 "
            "(and be recorded as fp16)")


RULES = (
    # --- data (the recipe's, and `prune.data` / `distill.data`) ---
    Rule("data*", ("config", "split", "validation_split"),
         lambda r, o: (f"{{p}}.source is {_local(o.source)} (these choose among a Hub dataset's configurations and "
                       "splits)") if _local(o.source) else None,
         "remove them; local data is split by {p}.validation_percent", on=("source",)),
    Rule("data*", ("validation_percent",),
         lambda r, o: f"{{p}}.validation_split is '{o.validation_split}' (the dataset's own validation split)"
         if o.validation_split is not None and not _local(o.source) else None,
         "remove {p}.validation_percent, or validation_split to hold out documents", on=("validation_split", "source")),
    Rule("data*", ("messages_column", "prompt_column", "response_column", "chat_template", "bad_rows"),
         lambda r, o: "{p}.format is text (they read conversations)" if o.format == "text" else None,
         "set {p}.format: chat, or remove them", on=("format",)),
    Rule("data*", ("text_column",),
         lambda r, o: "{p}.format is chat (conversations come from messages_column, or prompt_column and "
         "response_column)" if o.format == "chat" else None,
         "remove {p}.text_column, or use {p}.format: text", on=("format",)),
    Rule("data*", ("prompt_column", "response_column"),
         lambda r, o: f"{{p}}.messages_column is '{o.messages_column}' (rows hold either a list of turns or a prompt "
         "and a response)" if o.format == "chat" and o.messages_column != "messages" else None,
         "keep the key(s) naming the columns your data has, and remove the others", on=("messages_column", "format")),
    Rule("prune.data", ("validation_split",),
         lambda r, o: "prune calibrates on the training split only" if not _local(o.source) else None,
         "remove prune.data.validation_split", on=("source",)),
    Rule("prune.data", ("max_train_blocks",),
         lambda r, o: "prune.data.mix is empty: prune.calibration_blocks blocks are drawn from the whole training "
         "split" if not o.mix else None, "set prune.calibration_blocks instead", on=("mix",)),
    Rule("distill.data", ("validation_split",),
         lambda r, o: "distill.eval_steps is null: distill does not evaluate while training (evaluate scores the "
         "recipe's validation split)" if r.distill.eval_steps is None and not _local(o.source) else None,
         "set distill.eval_steps, or remove distill.data.validation_split", on=("source", "distill.eval_steps")),
    Rule("*.mix[]", ("config", "split"),
         lambda r, o: f"{{p}}.source is {_local(o.source)} (these choose among a Hub dataset's configurations and "
         "splits)" if _local(o.source) else None, "remove them", on=("source",)),
    # --- training (finetune and distill) ---
    Rule("train", ("epochs",),
         lambda r, o: f"{{p}}.max_steps is {o.max_steps} (a step count ends training, whatever the epochs)"
         if o.max_steps != -1 else None,
         "remove {p}.epochs, or set {p}.max_steps: -1 to train for epochs", on=("max_steps",)),
    Rule("train", ("warmup_ratio",),
         lambda r, o: "{p}.lr_scheduler is constant (it has no warmup)" if o.lr_scheduler == "constant" else None,
         "use {p}.lr_scheduler: constant_with_warmup, or remove warmup_ratio", on=("lr_scheduler",)),
    Rule("train", ("eval_steps",),
         lambda r, o: f"{{p}}.max_steps is {o.max_steps}: training ends before the first evaluation"
         if o.eval_steps is not None and 0 < o.max_steps < o.eval_steps else None,
         "set {p}.eval_steps to at most max_steps", on=("max_steps",)),
    Rule("train", ("save_steps",),
         lambda r, o: f"{{p}}.max_steps is {o.max_steps}: training ends before the first checkpoint"
         if o.save_steps is not None and 0 < o.max_steps < o.save_steps else None,
         "set {p}.save_steps to at most max_steps (or null for no checkpoints)", on=("max_steps",)),
    Rule("train", ("save_total_limit",),
         lambda r, o: "{p}.save_steps is null: no checkpoint is written"
         if o.save_steps is None and not o.best_model else None,
         "set {p}.save_steps, or remove save_total_limit", on=("save_steps", "eval_steps")),
    Rule("train", ("precision",), lambda r, o: _cpu_fp16(o), "use {p}.precision: bf16, fp32 or auto"),
    # --- finetune ---
    Rule("finetune", ("lora",),
         lambda r, o: "finetune.method is full (adapter settings apply to lora and qlora)"
         if o.method == "full" else None, "set finetune.method: lora (or qlora), or remove them", on=("method",)),
    Rule("finetune", ("qlora",),
         lambda r, o: f"finetune.method is {o.method} (the 4-bit base settings apply to qlora only)"
         if o.method != "qlora" else None, "set finetune.method: qlora, or remove them", on=("method",)),
    Rule("finetune.qat", ("*",),
         lambda r, o: "finetune.qat.enabled is false (the default)" if not o.enabled else None,
         "set finetune.qat.enabled: true, or remove them", switch="enabled"),
    Rule("finetune.qat", ("fake_quant_after_n_steps",),
         lambda r, o: f"finetune.max_steps is {r.finetune.max_steps}: no step would train on the grid"
         if o.enabled and 0 < r.finetune.max_steps <= o.fake_quant_after_n_steps else None,
         "set fake_quant_after_n_steps below finetune.max_steps", on=("enabled", "finetune.max_steps")),
    # --- prune ---
    Rule("prune", ("*",), lambda r, o: "prune.enabled is false (the default)" if not o.enabled else None,
         "set prune.enabled: true, or remove them", switch="enabled"),
    Rule("prune", ("count_embeddings", "axes", "round_to"),
         lambda r, o: "prune.target_params is not set (they shape a target_params cut; explicit sizes are used "
         "as given)" if o.target_params is None else None,
         "set prune.target_params instead of explicit sizes, or remove them", on=("target_params",)),
    Rule("prune", ("round_to",),
         lambda r, o: f"prune.axes is {o.axes} (round_to rounds MLP and hidden widths)"
         if o.target_params is not None and not {"mlp", "hidden"} & set(o.axes) else None,
         "add mlp or hidden to prune.axes, or remove round_to", on=("target_params", "axes")),
    Rule("prune", ("mlp_importance",),
         lambda r, o: None if _cuts_mlp(o) else (f"prune.axes is {o.axes}" if o.target_params is not None else
                                                 "prune.intermediate_size is not set") + ": no MLP channel is cut",
         "cut MLP channels (mlp in prune.axes, or prune.intermediate_size), or remove mlp_importance",
         on=("target_params", "axes", "intermediate_size")),
    Rule("prune", ("refit",),
         lambda r, o: None if _cuts_width(o) else "the prune cut changes no width (prune.axes / explicit sizes cut "
         "layers only, or nothing): there is no output projection to re-fit",
         "remove prune.refit", on=("target_params", "axes", "hidden_size", "num_attention_heads", "intermediate_size")),
    Rule("prune", ("calibration_blocks", "batch_size", "data"),
         lambda r, o: "prune.sparsity.method is magnitude and no structured cut is asked for: nothing measures "
         "activations" if not o.structured and o.sparsity.enabled and o.sparsity.method == "magnitude" else None,
         "set prune.sparsity.method: wanda, or remove them", on=("sparsity", "target_params")),
    Rule("prune.sparsity", ("method", "scope", "write_compressed"),
         lambda r, o: "prune.sparsity.amount is 0 and pattern is unstructured: no weight is made zero"
         if not o.enabled else None,
         "set prune.sparsity.amount (e.g. 0.5) or pattern (e.g. 2:4), or remove them", on=("amount", "pattern")),
    # --- distill ---
    Rule("distill", ("every", "keep", "layers", "config"), lambda r, o: pruned_input(r, o),
         "remove them, or set prune.enabled: false (or point distill.input at an unpruned model)",
         on=("input", "prune.enabled")),
    Rule("distill", ("temperature", "kl"),
         lambda r, o: "distill.alpha_kd is 0 (there is no KD term)" if o.alpha_kd == 0 else None,
         "set distill.alpha_kd above 0, or remove them", on=("alpha_kd",)),
    Rule("distill", ("teacher",),
         lambda r, o: f"distill.alpha_kd and alpha_cos are 0 and {pruned_input(r, o)}: the teacher neither runs nor "
         "gives the student its layers" if o.alpha_kd == 0 and o.alpha_cos == 0 and pruned_input(r, o) else None,
         "remove distill.teacher, or set alpha_kd above 0", on=("alpha_kd", "alpha_cos", "input", "prune.enabled")),
    Rule("distill", ("teacher_precision",),
         lambda r, o: "distill.alpha_kd and alpha_cos are 0: the teacher never runs"
         if o.alpha_kd == 0 and o.alpha_cos == 0 else None,
         "remove distill.teacher_precision, or set alpha_kd above 0", on=("alpha_kd", "alpha_cos")),
    *(Rule(f"{name}.own_text", ("*",),
           lambda r, o, name=name: f"{name}.own_text.tokens is 0 (the default): the model writes nothing"
           if not o.tokens else None, f"set {name}.own_text.tokens (e.g. 16384), or remove them", switch="tokens")
      for name in ("prune", "distill")),
    # --- quantize ---
    Rule("quantize.candidates[]", ("calibration_tokens",),
         lambda r, o: f"{{p}} ({o.method}) is not data-aware (no awq, scale_estimation, gptq, lora_correction, "
         "calibration_samples or activation-based sensitivity_metric)" if not o.data_aware else None,
         "add calibration_samples (or a data-aware option), or remove calibration_tokens", on=("method",)),
    # nncf reads calibration activations only for these algorithms or to rank layers for backup_precision (ratio
    # < 1, by an activation-based metric: the default once there is data); else the blocks are drawn for nothing
    Rule("quantize.candidates[]", ("calibration_samples", "calibration_tokens"),
         lambda r, o: f"{{p}} ({o.method}) has no awq, scale_estimation, gptq or lora_correction, and "
         + ("ratio is 1 (every layer in 4-bit: none is ranked)" if o.ratio in (None, 1) else
            "sensitivity_metric is weight_quantization_error") + ": nncf reads no calibration activations"
         if o.method == "openvino-int4" and not any(getattr(o, k) for k in DATA_AWARE)
         and (o.ratio in (None, 1) or o.sensitivity_metric == "weight_quantization_error") else None,
         "add awq: true or scale_estimation: true (or ratio < 1 for mixed precision), or remove them",
         on=("method", "ratio", "sensitivity_metric", *DATA_AWARE)),
    Rule("quantize", ("max_general_ppl_increase",),
         lambda r, o: "general.tokens is 0: there is no general text to measure it on"
         if r.general.tokens == 0 else None,
         "set general.tokens (e.g. 2048), or remove the budget", on=("general.tokens",)),
    Rule("quantize", ("try_over_budget_inputs",),
         lambda r, o: "no quality budget is set (max_ppl_increase, max_general_ppl_increase and max_kl are null): "
         "no input is ever skipped" if all(getattr(o, k) is None for k in (
             "max_ppl_increase", "max_general_ppl_increase", "max_kl")) else None,
         "set a quality budget, or remove try_over_budget_inputs",
         on=("max_ppl_increase", "max_general_ppl_increase", "max_kl")),
    # --- evaluate ---
    Rule("evaluate.generation", ("num_beams",),
         lambda r, o: f"evaluate.generation.strategy is {o.strategy} (beams are for beam search)"
         if o.strategy != "beam" else None, "set strategy: beam, or remove num_beams", on=("strategy",),
         switch="evaluate.samples"),
    Rule("evaluate.generation", ("temperature", "top_k", "top_p", "seed"),
         lambda r, o: f"evaluate.generation.strategy is {o.strategy} (they shape sampling)"
         if o.strategy != "sample" else None, "set strategy: sample, or remove them", on=("strategy",),
         switch="evaluate.samples"),
    Rule("evaluate.task", ("context_words", "continuation_words"),
         lambda r, o: "data.format is chat (the offline task then picks each held-out prompt's answer: it uses docs "
         "and choices)" if r.data.format == "chat" else None, "remove them", on=("data.format",),
         switch="enabled"),
    Rule("evaluate", ("lm_eval_limit",),
         lambda r, o: "evaluate.lm_eval_tasks is empty (the limit applies to those tasks; the offline task's size is "
         "evaluate.task.docs)" if not o.lm_eval_tasks else None,
         "add lm_eval_tasks, or remove lm_eval_limit (task.docs sizes the offline task)", on=("lm_eval_tasks",)),
    Rule("evaluate", ("answer_metrics", "answer_tokens", "max_answers"),
         lambda r, o: "data.format is text (held-out answers are scored for chat data only)"
         if r.data.format != "chat" else None, "remove them, or use chat data (data.format: chat)",
         on=("data.format",), switch="answers"),
    # --- push ---
    Rule("push", ("user",),
         lambda r, o: f"push.repo '{o.repo}' names its namespace itself (no {{user}})"
         if "{user}" not in o.repo and "/" in o.repo else None,
         "put {user} in push.repo (e.g. {user}/{recipe}-{stage}), or remove push.user", on=("repo",)),
)

STAGES_WITH_SWITCH = ("finetune", "prune", "distill", "quantize", "evaluate")


def given_keys(raw, prefix: str = "") -> set[str]:
    """Every key path a raw recipe mapping writes: `finetune.lora.r`, `quantize.candidates[0].method`, ..."""
    out = set()
    if isinstance(raw, dict):
        for key, value in raw.items():
            path = f"{prefix}{key}"
            out.add(path)
            out |= given_keys(value, path + ".")
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            if isinstance(item, dict):
                out |= given_keys(item, f"{prefix.rstrip('.')}[{i}].")
    return out


def _owners(recipe, where: str):
    """(path, settings) for each settings object `where` names that the recipe holds."""
    datas = [("data", recipe.data)] + [(f"{s}.data", getattr(recipe, s).data) for s in ("prune", "distill")
                                        if getattr(getattr(recipe, s), "data", None) is not None]
    if where == "data*":
        return datas
    if where == "*.mix[]":
        return [(f"{p}.mix[{i}]", m) for p, d in datas for i, m in enumerate(d.mix or [])]
    if where == "train":
        return [("finetune", recipe.finetune), ("distill", recipe.distill)]
    if where.endswith("[]"):
        items = _get(recipe, where[:-2]) or []
        return [(f"{where[:-2]}[{i}]", item) for i, item in enumerate(items)]
    return [(where, _get(recipe, where))]


def _get(obj, path: str):
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        obj = obj[int(part[1:-1])] if part.startswith("[") else getattr(obj, part)
    return obj


def _default(obj, name: str):
    f = next(f for f in dataclasses.fields(obj) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _changed(settings, rel: str) -> bool:
    """Whether the key at `rel` (below `settings`) holds a value other than its default."""
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", rel)
    obj = settings
    for i, part in enumerate(parts):
        if part.startswith("[") or not dataclasses.is_dataclass(obj):
            return True  # inside a list or a free mapping: written is changed
        value = getattr(obj, part, None)
        if i == len(parts) - 1:
            return value != _default(obj, part)
        if value is None:
            return False
        obj = value
    return False


def _stage_off(path: str, recipe, given: set[str]) -> bool:
    """The settings belong to a stage the recipe switches off in writing (`<stage>.enabled: false`)."""
    stage = path.split(".")[0].split("[")[0]
    return (stage in STAGES_WITH_SWITCH and f"{stage}.enabled" in given
            and not getattr(getattr(recipe, stage), "enabled", True))


def _abs(p: str, key: str) -> str:
    """A key a rule reads: relative to the settings' path, or absolute when it starts with a section name."""
    return key if key.split(".")[0] in ("finetune", "prune", "distill", "quantize", "evaluate", "data", "general",
                                        "push") and "." in key else f"{p}.{key}"


def problems(recipe, given: set[str], errors: list[str]) -> list[str]:
    """A problem for every row of RULES that applies: the keys it ignores, why (the other key and its value) and
    the fix. Keys that already have a problem of their own, and rows whose deciding keys do, are left out."""
    def wrong(path: str) -> bool:
        return any(e == path or e.startswith((path + ":", path + ".", path + "[")) for e in errors)

    out, reported = [], set()
    for rule in RULES:
        for p, settings in _owners(recipe, rule.where):
            if settings is None or _stage_off(p, recipe, given) or any(wrong(_abs(p, k)) for k in rule.on):
                continue
            switch = _abs(p, rule.switch) if rule.switch else None
            if switch in given and not _get(recipe, switch):
                continue  # switched off in writing: its settings are kept for when it is switched on
            names = ([f.name for f in dataclasses.fields(settings) if f.name not in OFF]
                     if rule.keys == ("*",) else list(rule.keys))
            keys = sorted(g for g in given for n in names if (g == f"{p}.{n}" or g.startswith(f"{p}.{n}."))
                          and not any(k.startswith((g + ".", g + "[")) for k in given)  # the leaves only
                          and g not in reported and not wrong(g) and _changed(settings, g[len(p) + 1:]))
            if not keys:
                continue
            try:
                why = rule.when(recipe, settings)
            except (TypeError, AttributeError, ValueError):  # a value of the wrong type: reported by the parser
                continue
            if why is None:
                continue
            reported.update(keys)
            out.append(f"{keys[0]}{' (and ' + ', '.join(keys[1:]) + ')' if keys[1:] else ''}: "
                       f"{'has' if len(keys) == 1 else 'have'} no effect while {why.replace('{p}', p)}; "
                       f"{rule.fix.replace('{p}', p)}")
    return out
