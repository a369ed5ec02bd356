"""Evaluate: quality, size and speed of the base model and every stage output, side by side."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import answers, data, errors, formats, general, llamacpp, memprobe, models, report, scoring, tasks
from pipeline.context import Context
from pipeline.errors import StageError
from pipeline.folders import write_record
from pipeline.generate import GenerationConfig, describe, generate
from pipeline.metrics import model_device, repetition, speed, word_perplexity
from pipeline.records import fingerprint, read_record

log = logging.getLogger("pipeline")
DEFAULT_PROMPTS = ["The Python interpreter", "A list comprehension is"]


@dataclass
class EvaluateConfig:
    enabled: bool = True  # run this stage
    # which of `base`, `finetune`, `prune`, `distill`, `quantize` to evaluate (null = every stage folder; a folder
    # the run has not written is skipped)
    models: list[str] | None = None
    context: int = 256  # tokens per window
    # step between windows; every token is scored once (with `stride == context` the first token of each window
    # is not)
    stride: int = 128
    max_tokens: int | None = 8192  # score at most this many tokens per text (null = all)
    batch_size: int = 8  # windows per forward pass
    # scored positions per text at which each model's next-token distribution is compared with the fine-tuned
    # model's (KL divergence, top-1 agreement); its log-probabilities are held in memory (tokens x vocabulary x 4
    # bytes: 200 MB for 1024 x 49K); 0 = no comparison
    kl_tokens: int = 1024
    # extra `.txt` files scored besides the validation split (a column each in the report)
    texts: list[str] = field(default_factory=list)
    word_level: bool = False  # also report word-level perplexity (same NLL over whitespace words)
    speed: bool = True  # measure prefill and generate tokens/s on the run's device
    # measure each model's peak memory in a fresh process of its own (its load and one run of the speed
    # workload; a few seconds a model): in the evaluating process, memory an earlier model freed hides a later one's
    memory: bool = True
    prefill_tokens: int = 128  # prompt length for the prefill measurement
    new_tokens: int = 32  # greedy tokens generated per prompt when timing generation
    repeats: int = 3  # timed runs after one warm-up; the median is reported
    # prompts for the speed measurement and the samples
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    samples: bool = True  # each model's continuation of every prompt goes into the report
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # decoding for the samples
    # the offline lm-eval task built from the validation split (below)
    task: tasks.OfflineTaskConfig = field(default_factory=tasks.OfflineTaskConfig)
    # more lm-eval tasks for every model: standard names (`hellaswag`; data from the Hub) or paths of your own task
    # `.yaml` files; an unknown name is a recipe error
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_batch_size: int = 8  # lm-eval requests per forward pass
    lm_eval_limit: int | None = None  # documents scored per `lm_eval_tasks` task (null = all)
    # chat data: every model answers the held-out prompts (chat template, greedy) and `answer_metrics` score them
    answers: bool = True
    # `evaluate` metrics: the repository's own (offline), an `evaluate` metric folder, or a Hub metric name
    answer_metrics: list[str] = field(default_factory=lambda: ["exact_match", "chrf", "rouge_l"])
    answer_tokens: int = 64  # new tokens per answer
    max_answers: int | None = 20  # held-out prompts answered per model (null = all)
    # GGUF folders: also llama.cpp's own perplexity (same tokens and windows), tokenization check and tokens/s,
    # when `llama-cpp-python` is installed (`make install-llamacpp`); skipped with a note otherwise
    llamacpp: bool = True

    def check(self) -> list[str]:
        problems = []
        if self.context < 2:
            problems.append(f"context: {self.context} must be at least 2")
        if not 1 <= self.stride <= self.context:
            problems.append(f"stride: {self.stride} must be between 1 and context ({self.context})")
        if self.max_tokens is not None and self.max_tokens < 2:
            problems.append(f"max_tokens: {self.max_tokens} must be at least 2, or null for all")
        if self.kl_tokens < 0:
            problems.append(f"kl_tokens: {self.kl_tokens} must be 0 (no comparison) or more")
        for key in ("batch_size", "prefill_tokens", "new_tokens", "repeats"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: {getattr(self, key)} must be at least 1")
        for t in self.texts:
            path = Path(t).expanduser()
            problem = ("is a folder; give the .txt files in it one by one" if path.is_dir() else
                       "does not exist" if not path.is_file() else errors.file_problem(path))  # empty, not UTF-8
            problems += [f"texts: file '{t}' {problem}"] if problem else []
        if self.lm_eval_batch_size < 1:
            problems.append(f"lm_eval_batch_size: {self.lm_eval_batch_size} must be at least 1")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            problems.append(f"lm_eval_limit: {self.lm_eval_limit} must be at least 1, or null for all")
        problems += tasks.check_names(self.lm_eval_tasks)
        problems += answers.check_names(self.answer_metrics)
        if self.answer_tokens < 1:
            problems.append(f"answer_tokens: {self.answer_tokens} must be at least 1")
        if self.max_answers is not None and self.max_answers < 1:
            problems.append(f"max_answers: {self.max_answers} must be at least 1, or null for all")
        if (self.speed or self.memory or self.samples) and not self.prompts:
            problems.append("prompts: give at least one prompt, or set speed, memory and samples to false")
        problems += [f"prompts[{i}]: {p!r} is empty; give some text for the samples and the speed measurement "
                     "to continue" for i, p in enumerate(self.prompts) if isinstance(p, str) and not p.strip()]
        return problems


def evaluate_folder(folder: Path, cfg: EvaluateConfig, ctx: Context, task_plan: dict | None = None,
                    answer_plan: dict | None = None, reference: scoring.Reference | None = None) -> dict:
    """Every metric for one model folder; cached in its pipeline.json for unchanged settings."""
    record = read_record(folder)
    metrics = {k: v if isinstance(v, str) else "loaded" for k, v in (answer_plan or {}).get("metrics", {}).items()}
    # the plans (which tasks and metrics run, which are skipped) too: installing lm-eval re-runs the tasks
    files = data.stamps(ctx.data)  # the validation text edited in place is scored again
    if reference is None:  # (a Reference without a KL comparison is falsy but still the one to use)
        reference = _reference(cfg, ctx)
    general_text = general.text(ctx.general, ctx.run_dir, ctx.seed)  # written once per base model
    compared = [reference.fingerprint, general_text] if reference or general_text else []
    eval_fp = fingerprint("evaluate", dataclasses.asdict(cfg), dataclasses.asdict(ctx.data), ctx.seed,
                          record.fingerprint, task_plan, metrics, *([files] if files else []), *compared)
    cached = record.scoreboard
    if cached.get("fingerprint") == eval_fp and not ctx.force:
        log.info("evaluate: %s already evaluated with these settings, reusing", folder.name)
        return cached
    device = models.pick_device()
    started = time.time()
    # before this process loads the model: two copies at once could exceed the memory one needs
    memory = (memprobe.measure(folder, str(device), cfg.prompts, cfg.prefill_tokens, cfg.new_tokens)
              if cfg.memory else {})
    if "peak_mem_error" in memory:
        log.warning("evaluate: %s: peak memory not measured: %s", folder.name, memory["peak_mem_error"])
    elif memory:
        log.info("evaluate: %s peak memory %.0f MB (loaded in a process of its own)", folder.name,
                 memory["peak_mem_mb"])
    model, tokenizer = formats.load_folder(folder, device_map=str(device))
    chat = ctx.data.format == "chat"  # samples and answers under the chat template the model was tuned with
    if chat and ctx.data.chat_template:
        tokenizer.chat_template = ctx.data.chat_template
    texts = scoring.texts(ctx, tokenizer, cfg.max_tokens, cfg.texts, keep_text=cfg.word_level)
    evaluations = scoring.measure(model, texts, cfg.context, cfg.stride, cfg.batch_size, reference, folder,
                                  scoring.Measurements(ctx.run_dir, ctx.force), "evaluate")
    for result, (name, _, text) in zip(evaluations, texts):
        if cfg.word_level:
            result["word_perplexity"] = word_perplexity(result, text)
        versus = (f", KL {result['kl']:.4f} nats and top-1 {result['top1']:.1%} vs {reference.folder.name}"
                  if "kl" in result else "")
        log.info("evaluate: %s perplexity %.3f on %s (%d tokens)%s", folder.name, result["perplexity"], name,
                 result["scored_tokens"], versus)
    row = {
        "perplexity": evaluations[0]["perplexity"],
        "evaluations": evaluations,
        "reference": reference.folder.name if reference else None,
        # an OpenVINO model has no torch parameters; its stage record knows the count
        "params": models.count_params(model) or record.params,
        "disk_mb": formats.disk_mb(folder),
        "device": str(model_device(model)),  # OpenVINO runs on the CPU whatever torch could use
        **memory,
    }
    if cfg.speed:
        row.update(speed(model, tokenizer, cfg.prompts, cfg.prefill_tokens, cfg.new_tokens, cfg.repeats))
        log.info("evaluate: %s prefill %.0f tok/s, generate %.1f tok/s", folder.name, row["prefill_tok_s"],
                 row["gen_tok_s"])
    if cfg.samples:
        try:
            row["samples"] = [{"prompt": p, "output": generate(model, tokenizer, p, cfg.generation, chat=chat)}
                              for p in cfg.prompts]
        except ValueError as err:  # a chat recipe whose model has no chat template
            raise StageError(f"evaluate: {folder.name}: {err}") from err
        row["decoding"] = describe(cfg.generation)
        row["repetition_4gram"] = repetition([s["output"] for s in row["samples"]])
    plan = task_plan or {}
    if plan.get("run"):
        row["tasks"] = tasks.run_tasks(model, tokenizer, folder, plan["run"], plan["include"], ctx.seed,
                                       cfg.lm_eval_batch_size, cfg.lm_eval_limit, chat=chat)
    if plan.get("skipped"):
        row["tasks"] = {**plan["skipped"], **row.get("tasks", {})}
    if answer_plan:
        row["answers"] = answers.score(model, tokenizer, answer_plan["prompts"], answer_plan["metrics"],
                                       cfg.answer_tokens)
        log.info("evaluate: %s answers to %d held-out prompts: %s", folder.name, row["answers"]["prompts"],
                 ", ".join(f"{k} {v}" for k, v in row["answers"]["scores"].items()))
    gguf = formats.gguf.file_of(folder) if cfg.llamacpp else None
    if gguf is not None:
        row["llamacpp"] = llamacpp_scores(gguf, tokenizer, texts, cfg)
    row.update(seconds=round(time.time() - started, 1), fingerprint=eval_fp)
    # The stage folder's record and card carry their own evaluation, as Hub cards do.
    record.evaluation = evaluations
    record.tasks = row.get("tasks", {})
    record.answer_scores = row.get("answers", {}).get("scores", {})
    record.scoreboard = row
    write_record(folder, record)
    return row


def plan_tasks(cfg: EvaluateConfig, ctx: Context) -> dict:
    """Which lm-eval tasks every model runs (`run`, with the folders their YAML files are in) and which are
    skipped for all of them, with the reason (`skipped`); writes the offline task into run_dir/tasks/."""
    plan = {"run": list(cfg.lm_eval_tasks), "include": [], "skipped": {}}
    if cfg.task.enabled:
        try:
            path = tasks.offline_task(ctx.data, cfg.task, ctx.seed, ctx.run_dir)
            plan["run"].insert(0, tasks.OFFLINE_TASK)
            plan["include"].append(path.parent)
        except ValueError as err:
            log.warning("evaluate: no offline task: %s", err)
            plan["skipped"][tasks.OFFLINE_TASK] = {"skipped": str(err)}
    missing = tasks.available()
    if missing and plan["run"]:
        log.warning("evaluate: %s; the lm-eval tasks %s are skipped", missing, ", ".join(plan["run"]))
        plan["skipped"].update({t: {"skipped": missing} for t in plan["run"]})
        plan["run"] = []
    return plan


def plan_answers(cfg: EvaluateConfig, ctx: Context) -> dict | None:
    """For chat data: the held-out prompts every model answers and the metrics (or why one is missing)."""
    if ctx.data.format != "chat" or not cfg.answers or not cfg.answer_metrics:
        return None
    prompts = answers.held_out(data.load_splits(ctx.data, ctx.seed), ctx.data, cfg.max_answers)
    if not prompts:
        log.warning("evaluate: the validation split has no conversation with an assistant turn to answer")
        return None
    return {"prompts": prompts, "metrics": answers.load_metrics(cfg.answer_metrics)}


def llamacpp_scores(path: Path, tokenizer, texts, cfg: EvaluateConfig) -> dict:
    """llama.cpp's own perplexity (same token ids, same windows) and speed for a GGUF file, when installed."""
    if not llamacpp.available():
        log.info("evaluate: %s is GGUF; install llama-cpp-python for llama.cpp's own perplexity and speed (%s)",
                 path.name, llamacpp.INSTALL)
        return {"skipped": "llama-cpp-python not installed"}
    result = llamacpp.evaluate(path, tokenizer, texts, cfg.context, cfg.stride, cfg.prompts,
                               cfg.prefill_tokens, cfg.new_tokens)
    log.info("evaluate: %s in llama.cpp: perplexity %.3f, generate %.1f tok/s, tokenization %s", path.name,
             result["evaluations"][0]["perplexity"], result["gen_tok_s"],
             "matches" if result["tokenization_matches"] else "DIFFERS from the Hugging Face tokenizer")
    return result


def _reference(cfg: EvaluateConfig, ctx: Context) -> scoring.Reference:
    return scoring.Reference(ctx.reference, cfg.kl_tokens, cfg.context, cfg.stride, cfg.batch_size)


def run(cfg: EvaluateConfig, ctx: Context) -> Path:
    rows = []
    plan, answer_plan = plan_tasks(cfg, ctx), plan_answers(cfg, ctx)
    reference = _reference(cfg, ctx)  # its log-probabilities are computed once for every model
    names = [n for n in cfg.models or ctx.model_folders if read_record(ctx.run_dir / n) is not None]
    log.info("evaluate: %d model(s) (%s): perplexity%s, %s%s%s", len(names), ", ".join(names),
             f" and KL against {reference.folder.name}" if reference else "",
             "speed, " if cfg.speed else "", "samples, " if cfg.samples else "",
             "tasks" if plan.get("run") else "no tasks")
    for name in cfg.models or ctx.model_folders:
        folder = ctx.run_dir / name
        record = read_record(folder)  # what the stage wrote; evaluate_folder adds only its scores to it
        if record is None:
            log.info("evaluate: no finished %s folder in %s, skipping it", name, ctx.run_dir)
            continue
        row = {"name": name, "folder": str(folder), **evaluate_folder(folder, cfg, ctx, plan, answer_plan, reference)}
        if name in ctx.stale:  # never reported as if the recipe had made it
            row["stale"] = ctx.stale[name]
            log.warning("evaluate: %s is stale: %s", name, ctx.stale[name])
        suspect = (record.details.get("source_check") or {}).get("problems")
        if suspect:  # loaded with check_source: false: the report says so at its top
            row["source_problems"] = suspect
        row["parent"] = record.parent  # the report's plot draws each model's arrow from the one it was made from
        if name == "prune":  # so the report can set the cut against the model it was cut from
            row["pruned_from"] = record.parent
        if name == "quantize":  # which candidate won and what the others scored: the stage's own summary
            keep = ("name", "input", "method", "status", "disk_mb", "perplexity", "quality", "kl", "top1", "gen_tok_s")
            row["quantization"] = {"chosen": record.chosen, "summary": record.summary,  # for the report's frontier
                                   "candidates": [{k: c.get(k) for k in keep} for c in record.details.get("candidates") or []]}
        sparse = (record.details or {}).get("sparsity")
        if sparse and "sparsity" in sparse:  # zeros in the block weights: the report's zeros column and its note
            row["sparsity"] = sparse["sparsity"]
            row["sparse"] = {k: sparse.get(k) for k in ("pattern", "method", "forms", "compressed")}
        if name == "distill":  # so the report can set the student against its teacher
            row["teacher"] = (record.teacher or {}).get("folder") or record.parent
        rows.append(row)
    report.write(ctx.run_dir, ctx.recipe, rows)
    return ctx.run_dir
