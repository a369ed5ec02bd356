"""Distill: a smaller student trained to match the teacher (KD) and the text (CE).

The student is the `prune` stage's output when pruning is on (the teacher is then the model it was cut
from), else a subset of the teacher's layers (DistilGPT2's initialisation) or a fresh model built from a
config; either way it must share the teacher's tokenizer so the two output distributions are over the same
vocabulary. `distill.data` lets it learn from other (or more, or more general) text than the fine-tune did.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer

from pipeline import data, formats, general, models, sparsity, surgery
from pipeline.context import Context, begin
from pipeline.data import DataConfig
from pipeline.general import OwnText
from pipeline.errors import StageError
from pipeline.folders import save_model, staging, write_record
from pipeline.records import read_record
from pipeline.training import (
    RUN_ONLY,
    TrainConfig,
    clear_checkpoints,
    fit,
    keep_sparse,
    training_args,
)

# Config entries that follow from the width; recomputed when the student's width changes.
DERIVED_FROM_WIDTH = ("head_dim",)


@dataclass
class DistillConfig(TrainConfig):
    enabled: bool = True  # run this stage
    # folder to read; `auto` = the pruned model as student (prune on), else the previous enabled stage's output
    # as teacher
    input: str = "auto"
    teacher: str = "auto"  # `auto` = the model the pruned student was cut from, else `input`; or a model folder
    # text to distill on, in the `data` schema: the keys it gives replace the recipe's `data` keys (null = the
    # recipe's `data`), so `{mix: [{source: wiki.txt}]}` adds general text to the fine-tuning text; the evaluate
    # stage still scores the recipe's validation split
    data: DataConfig | None = None
    # text the teacher writes itself, added to the distillation text's training blocks
    own_text: OwnText = field(default_factory=OwnText)
    # without `prune`: keep teacher layers 0, every, 2·every, ... (null = 2; DistilGPT2's initialisation)
    every: int | None = None
    keep: int | None = None  # or keep N evenly spaced layers, first and last included
    layers: list[int] | None = None  # or exactly these teacher layer indices, e.g. `[0, 3, 6, 11]`
    # or a fresh student: a mapping of overrides to the teacher's config (`{num_hidden_layers: 6, hidden_size: 384,
    # intermediate_size: 1024}`), a mapping with `model_type` for another architecture (`{model_type: gpt2,
    # n_layer: 6, n_embd: 384, n_head: 6}`), or a folder / Hub id holding a `config.json`. `vocab_size` always
    # comes from the teacher
    config: dict[str, Any] | str | None = None
    temperature: float = 2.0  # softens both distributions in the KD term
    alpha_kd: float = 0.5  # weight of the KD term, T² · KL (0 = plain LM training of the student)
    alpha_ce: float = 0.5  # weight of the next-token cross-entropy
    alpha_cos: float = 0.0  # weight of the hidden-state cosine term (DistilBERT's); needs the teacher's hidden size
    # `forward` KL(teacher ‖ student), mass-covering as in Hinton et al.; `reverse` KL(student ‖ teacher),
    # mode-seeking as in MiniLLM
    kl: Literal["forward", "reverse"] = "forward"
    # `auto` = bf16 where the hardware has it natively (recent GPUs; CPUs with AVX512-BF16/AMX), else fp32; or
    # `fp32`, `bf16`
    teacher_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # why: a student with half its layers gone starts far off: 1e-3 beat 5e-4 and 2e-3 (bench/distill.py)
    learning_rate: float = 1e-3
    # why: TrainConfig checkpoints nothing by default; a training stage does, so that a killed run resumes
    save_steps: int | None = field(default=200, metadata=RUN_ONLY)
    # regexes (searched in parameter names, as Axolotl's key): train only the matching parameters, e.g. `[mlp]`
    # after an MLP-width cut; null = all. The record gives `trained_params`
    unfrozen_parameters: list[str] | None = None

    def check(self) -> list[str]:
        problems = super().check()
        for pattern in self.unfrozen_parameters or []:
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(f"unfrozen_parameters: '{pattern}' is not a regular expression ({err})")
        if self.unfrozen_parameters == []:
            problems.append("unfrozen_parameters: an empty list trains nothing; use null to train every parameter")
        if self.every is not None and self.every < 1:
            problems.append(f"every: {self.every} must be at least 1")
        if self.keep is not None and self.keep < 1:
            problems.append(f"keep: {self.keep} must be at least 1")
        if self.teacher != "auto" and not (Path(self.teacher) / "config.json").is_file():
            problems.append(f"teacher: '{self.teacher}' is not a model folder; use auto or a stage output folder")
        if self.keep is not None and self.layers is not None:
            problems.append("keep and layers: set only one of them")
        others = [k for k in ("keep", "layers", "config") if getattr(self, k) is not None]
        if self.every is not None and others:  # each picks the student's layers its own way: one would be ignored
            problems.append(f"every and {others[0]}: set only one of them (every keeps layers 0, every, 2·every, "
                            "...; keep and layers name them; config builds a fresh student)")
        if self.config is not None and (self.keep is not None or self.layers is not None):
            problems.append("config: a fresh student from `config` cannot also keep teacher layers; "
                            "remove keep/layers or config")
        if isinstance(self.config, dict) and "vocab_size" in self.config:
            problems.append("config.vocab_size: the student always uses the teacher's vocabulary; remove it")
        if self.temperature <= 0:
            problems.append(f"temperature: {self.temperature} must be positive")
        weights = (self.alpha_kd, self.alpha_ce, self.alpha_cos)
        if min(weights) < 0 or sum(weights) == 0:
            problems.append("alpha_kd/alpha_ce/alpha_cos: must be non-negative and not all zero")
        return problems


def layer_map(cfg: DistillConfig, n_layers: int) -> list[int]:
    """Teacher layer indices the student keeps, in order."""
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not 0 <= i < n_layers]
        if bad or not cfg.layers:
            raise StageError(f"distill.layers: {bad or 'empty'} out of range; the teacher has layers 0..{n_layers - 1}")
        return list(cfg.layers)
    if cfg.keep is not None:
        if cfg.keep > n_layers:
            raise StageError(f"distill.keep: {cfg.keep} is more than the teacher's {n_layers} layers")
        if cfg.keep == 1:
            return [0]
        return sorted({round(i * (n_layers - 1) / (cfg.keep - 1)) for i in range(cfg.keep)})
    return list(range(0, n_layers, cfg.every or 2))


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks (GPT-2's `h`, Llama's `layers`, ...)."""
    return surgery.decoder_stack(model)[1]


def student_from_teacher(teacher, keep: list[int]):
    """A new model holding copies of the teacher's layers `keep` (and its embeddings, norms and head)."""
    return surgery.apply(teacher, surgery.Cut(layers=list(keep))).requires_grad_(True)


def student_config(spec: dict | str, teacher_config, trust_remote_code: bool = False):
    """The config of a fresh student: `spec` overrides the teacher's config, names another
    architecture (`model_type`), or is a folder / Hub id holding a config.json."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if isinstance(spec, str):
        try:
            config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise StageError(f"distill.config: cannot read a model config from '{spec}': {err}") from err
    else:
        overrides = dict(spec)
        model_type = overrides.pop("model_type", None)
        if model_type is None:
            base = type(teacher_config)
            values = teacher_config.to_dict()
            for key in ("_name_or_path", "architectures", "layer_types", "transformers_version", "dtype"):
                values.pop(key, None)
            if {"hidden_size", "num_attention_heads"} & set(overrides):
                for key in DERIVED_FROM_WIDTH:
                    values.pop(key, None)
        elif model_type in CONFIG_MAPPING:
            base = CONFIG_MAPPING[model_type]
            # the teacher's special tokens, so generation and padding behave the same
            values = {k: getattr(teacher_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        else:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
            raise StageError(f"distill.config.model_type: unknown architecture '{model_type}'"
                             + (f"; did you mean {', '.join(close)}?" if close else ""))
        known = base()
        unknown = [k for k in overrides if not hasattr(known, k)]
        if unknown:
            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known.to_dict(), n=1))
                     else k for k in unknown]
            raise StageError(f"distill.config: {', '.join(hints)} not a setting of {base.__name__}")
        try:
            config = base(**{**values, **overrides, "vocab_size": teacher_config.vocab_size})
        except Exception as err:  # strict config validation raises several types
            raise StageError(f"distill.config: invalid {base.__name__}: {err}") from err
    config.use_cache = True
    return config


def check_vocab(t_vocab: int, s_vocab: int, tokenizer, student_tokenizer=None) -> None:
    """Teacher and student must score the same vocabulary, or KD compares unrelated tokens."""
    if t_vocab != s_vocab:
        raise StageError(
            f"distill: vocabulary mismatch: the teacher has {t_vocab} tokens, the student {s_vocab}. "
            "KD compares the two next-token distributions token by token, so the student must use the "
            f"teacher's vocabulary: point distill.config at a config with vocab_size {t_vocab}, or use a mapping"
        )
    if len(tokenizer) > s_vocab:
        raise StageError(f"distill: the tokenizer has {len(tokenizer)} tokens but the models only {s_vocab}")
    if student_tokenizer is not None and student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise StageError(
            "distill: tokenizer mismatch: the tokenizer next to distill.config is not the teacher's "
            f"({len(student_tokenizer)} vs {len(tokenizer)} tokens, or different ids). The student is trained "
            "with the teacher's tokenizer; point distill.config at a config that uses it"
        )


def _folder_tokenizer(spec: dict | str | None):
    """The tokenizer saved next to a `config` folder, if any (to check it against the teacher's)."""
    if not isinstance(spec, str) or not Path(spec).is_dir():
        return None
    if not any((Path(spec) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise StageError(f"distill.config: cannot read the tokenizer in '{spec}': {err}") from err


def build_student(cfg: DistillConfig, teacher, tokenizer, trust_remote_code: bool = False):
    """Return (student, layer map or None); raises StageError before any training if it cannot work."""
    from transformers import AutoModelForCausalLM

    config = teacher.config
    if cfg.config is not None:
        config = student_config(cfg.config, teacher.config, trust_remote_code)
        check_vocab(teacher.config.vocab_size, config.vocab_size, tokenizer, _folder_tokenizer(cfg.config))
    check_cos(cfg, config, teacher.config)
    if cfg.config is None:
        keep = layer_map(cfg, teacher.config.num_hidden_layers)
        return student_from_teacher(teacher, keep), keep
    student = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student, None


def config_problems(cfg: DistillConfig, teacher_config, trust_remote_code: bool = False,
                    student=None) -> list[str]:
    """What build_student and unfreeze would refuse, from configs alone (`validate`, before any stage runs): the
    teacher layers kept, the student's config, the cosine term, and the unfrozen patterns, matched against the
    student's parameter names built on the meta device (no weights, no memory). `student`: the config of a
    student made elsewhere (the pruned model). A student config named by a Hub id is left to the run."""
    if student is None and isinstance(cfg.config, str) and not (Path(cfg.config) / "config.json").is_file():
        return []
    try:
        if student is not None:
            config = student
        elif cfg.config is not None:
            config = student_config(cfg.config, teacher_config, trust_remote_code)
        else:  # the teacher's layers `keep`, renumbered from 0: names as a model of that depth has them
            config = surgery.config_for(teacher_config, {"num_hidden_layers": len(layer_map(
                cfg, teacher_config.num_hidden_layers))})
        check_cos(cfg, config, teacher_config)
        if cfg.unfrozen_parameters is not None and (model := models.meta_model(config, trust_remote_code)):
            unfreeze(model, cfg.unfrozen_parameters)
    except StageError as err:
        return [str(err)]
    return []


def check_cos(cfg: DistillConfig, student_config, teacher_config) -> None:
    if cfg.alpha_cos > 0 and student_config.hidden_size != teacher_config.hidden_size:
        raise StageError(
            f"distill.alpha_cos: the cosine term compares hidden states, but the student's hidden size "
            f"({student_config.hidden_size}) differs from the teacher's ({teacher_config.hidden_size}); "
            "set alpha_cos: 0 or give the student the teacher's hidden_size"
        )


def teacher_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The teacher only runs forward passes, so bf16 costs little accuracy and saves time and memory."""
    cuda = device.type == "cuda"
    if precision == "auto":
        return torch.bfloat16 if models.native_bf16(device) else torch.float32
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise StageError("distill.teacher_precision: bf16 is not supported by this GPU; use fp32 or auto")
    return torch.bfloat16 if precision == "bf16" else torch.float32


class DistillTrainer(Trainer):
    """Trainer whose loss is alpha_kd * T^2 * KL + alpha_ce * CE + alpha_cos * (1 - cos(hidden states))."""

    def __init__(self, *args, teacher, temperature: float, alpha_kd: float, alpha_ce: float,
                 alpha_cos: float = 0.0, kl: str = "forward", teacher_dtype=torch.float32, **kwargs):
        super().__init__(*args, **kwargs)
        # our loss is a per-token mean, so let Trainer divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device, dtype=teacher_dtype)
        self.temperature, self.alpha_kd, self.alpha_ce, self.alpha_cos = temperature, alpha_kd, alpha_ce, alpha_cos
        self.kl = kl

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        need_hidden = self.alpha_cos > 0
        outputs = model(**inputs, output_hidden_states=need_hidden)
        loss = self.alpha_ce * outputs.loss
        if self.alpha_kd > 0 or need_hidden:
            with torch.no_grad():
                t_out = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                     output_hidden_states=need_hidden)
            mask = inputs["labels"][:, 1:] != -100  # logits at position i predict token i+1
            if self.alpha_kd > 0:
                loss = loss + self.alpha_kd * kd_loss(outputs.logits, t_out.logits, inputs["labels"],
                                                      self.temperature, self.kl)
            if need_hidden:
                s_h, t_h = outputs.hidden_states[-1][:, :-1][mask], t_out.hidden_states[-1][:, :-1][mask]
                cos = torch.nn.functional.cosine_similarity(s_h.float(), t_h.float(), dim=-1)
                loss = loss + self.alpha_cos * (1 - cos).mean()
        return (loss, outputs) if return_outputs else loss


def kd_loss(s_logits, t_logits, labels, temperature: float, kl: str = "forward") -> torch.Tensor:
    """Token-averaged T^2 * KL over positions that carry a label: forward KL(teacher || student)
    (mass-covering, Hinton et al.) or reverse KL(student || teacher) (mode-seeking, MiniLLM)."""
    mask = labels[:, 1:] != -100
    log_s = torch.log_softmax(s_logits[:, :-1][mask].float() / temperature, -1)
    log_t = torch.log_softmax(t_logits[:, :-1][mask].float() / temperature, -1)
    if kl == "reverse":
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    return per_token.mean() * temperature**2


def unfreeze(student, patterns: list[str] | None) -> int:
    """Train only the parameters whose names match one of `patterns` (all when None); the count trained."""
    if patterns is None:
        return models.count_params(student)
    names = [name for name, _ in student.named_parameters()]
    matched = {name for name in names if any(re.search(p, name) for p in patterns)}
    if not matched:
        raise StageError(f"distill.unfrozen_parameters: {patterns} match none of the student's parameters "
                         f"(e.g. {', '.join(names[:3])}); fix the patterns or use null to train all")
    for name, param in student.named_parameters():
        param.requires_grad_(name in matched)
    return sum(p.numel() for p in student.parameters() if p.requires_grad)


def run(cfg: DistillConfig, ctx: Context) -> Path:
    from transformers import default_data_collator, set_seed

    stage = begin(ctx, "distill", cfg)
    if stage is None:
        return ctx.run_dir / "distill"
    set_seed(ctx.seed)
    pruned = _pruned_from(ctx.inputs["distill"])
    teacher_folder = Path(cfg.teacher) if cfg.teacher != "auto" else pruned or ctx.inputs["distill"]
    teacher, tokenizer = formats.load_folder(teacher_folder)
    if pruned is not None:  # the student is the pruned model, healed against the model it was cut from
        student, _ = formats.load_folder(ctx.inputs["distill"])
        student.requires_grad_(True)
        check_vocab(teacher.config.vocab_size, student.config.vocab_size, tokenizer)
        check_cos(cfg, student.config, teacher.config)
        keep = None
    else:
        student, keep = build_student(cfg, teacher, tokenizer, ctx.trust_remote_code)
    trainable = unfreeze(student, cfg.unfrozen_parameters)
    evaluate = cfg.eval_steps is not None  # eval_loss is the distillation loss on the validation blocks
    args = training_args(cfg, ctx.run_dir / ".trainer" / "distill", ctx.seed, evaluate=evaluate)
    t_dtype = teacher_dtype(cfg.teacher_precision, args.device)
    text = cfg.data or ctx.data
    text = general.with_own_text(text, cfg.own_text, teacher, tokenizer, teacher_folder, ctx.run_dir, ctx.seed)
    per_source: dict = {}
    blocks = data.text_blocks(text, tokenizer, ctx.seed, per_source)
    data.require_rows(blocks, ("train", "validation") if evaluate else ("train",), "distill", text)
    t_params, t_layers = models.count_params(teacher), teacher.config.num_hidden_layers
    trainer = DistillTrainer(
        model=student,
        args=args,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"] if evaluate else None,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        teacher=teacher,
        temperature=cfg.temperature,
        alpha_kd=cfg.alpha_kd,
        alpha_ce=cfg.alpha_ce,
        alpha_cos=cfg.alpha_cos,
        kl=cfg.kl,
        teacher_dtype=t_dtype,
    )
    sparse = keep_sparse(trainer, student, ctx.inputs["distill"], cfg.l1, "distill")
    metrics = fit(trainer, cfg, stage.fingerprint, ctx.recipe, ctx.data.block_size, force=ctx.force)
    s_params = models.count_params(trainer.model)
    loss = {"alpha_kd": cfg.alpha_kd, "alpha_ce": cfg.alpha_ce, "alpha_cos": cfg.alpha_cos,
            "temperature": cfg.temperature, "kl": cfg.kl, "teacher_precision": str(t_dtype).replace("torch.", "")}
    teacher_info = {"folder": str(teacher_folder), "base_model": stage.parent.base_model,
                    "fingerprint": stage.parent.fingerprint, "params": t_params, "layers": t_layers,
                    "architecture": type(teacher).__name__}
    with staging(stage.out) as tmp:
        save_model(tmp, trainer.model, tokenizer)
        kept = sparsity.trained_record(tmp, trainer.model, tokenizer, ctx.inputs["distill"], cfg.l1) if sparse else None
        if kept is not None:
            metrics.update(sparsity=kept["sparsity"])
        write_record(tmp, stage.record(
            ctx,
            metrics={"params": s_params, "teacher_params": t_params, "trained_params": trainable,
                     "params_ratio": round(s_params / t_params, 4), **metrics},
            teacher=teacher_info,
            layer_map=keep,
            student_config=None if keep is not None or pruned else cfg.config,
            student_init="pruned" if pruned else "layers" if keep is not None else "config",
            distill_data={"label": text.label, "mix": [dataclasses.asdict(m) for m in text.mix],
                          "train_blocks": per_source, "block_size": text.block_size},
            loss=loss,
            unfrozen_parameters=cfg.unfrozen_parameters,
            sparsity=kept,
            tags=["distillation"] + (["sparse"] if kept is not None else []),
            summary=_summary(keep, cfg, teacher_info, trainer.model, loss, pruned, text)
            + (f"\n{sparsity.training_note(kept)}" if kept is not None else ""),
        ))
    clear_checkpoints(trainer.args.output_dir)
    return stage.out


def _pruned_from(folder: Path) -> Path | None:
    """The folder a `prune` stage output was cut from (the teacher for healing it), else None."""
    record = read_record(folder)
    return Path(record.parent) if record is not None and record.stage == "prune" and record.parent else None


def _summary(keep, cfg: DistillConfig, teacher: dict, student, loss: dict, pruned, text: DataConfig) -> str:
    if pruned is not None:
        what = (f"Student: the pruned model ({student.config.num_hidden_layers} layers, hidden size "
                f"{student.config.hidden_size}), healed by distillation from the model it was cut from.")
    elif keep is not None:
        what = f"Student with teacher layers {keep} ({len(keep)} of {teacher['layers']}), initialised from the teacher."
    else:
        what = (f"Fresh {type(student).__name__} student ({student.config.num_hidden_layers} layers, hidden size "
                f"{student.config.hidden_size}) built from `distill.config` {cfg.config!r}.")
    terms = [f"{cfg.alpha_kd} x {cfg.kl} KD (T={cfg.temperature})", f"{cfg.alpha_ce} x CE"]
    if cfg.alpha_cos:
        terms.append(f"{cfg.alpha_cos} x cosine(hidden states)")
    return (f"{what}\nTeacher: `{teacher['folder']}` ({teacher['architecture']}, {teacher['layers']} layers, "
            f"{teacher['params']:,} parameters; base model {teacher['base_model']}), "
            f"run in {loss['teacher_precision']}.\nLoss: {' + '.join(terms)}.\nDistillation text: {text.label}"
            + "".join(f" + {m.source} (weight {m.weight})" for m in text.mix) + ".")
