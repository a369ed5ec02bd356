"""Task-level evaluation with the lm-eval harness: standard task names, the user's own task YAML files,
and an offline task built from the recipe's own validation text.

The offline task (`heldout_continuation`) is multiple-choice continuation: each document is a stretch of
a validation passage, and the choices are its true next words and words from other passages (for chat
data: each held-out prompt, with its answer among other conversations' answers). It is generated
deterministically from the recipe's seed and written as an ordinary lm-eval task (a YAML file and a JSONL
data file, `dataset_path: json`) in `runs/<recipe>/tasks/`, so `lm_eval` itself runs it and a user can
re-run it by hand:

    lm_eval --model hf --model_args pretrained=runs/quickstart/base \\
            --include_path runs/quickstart/tasks --tasks heldout_continuation
    (an OpenVINO folder: --model openvino --device cpu)
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline import answers, data, formats

log = logging.getLogger("pipeline")
OFFLINE_TASK = "heldout_continuation"
INSTALL = "pip install 'lm-eval>=0.4.10' (or `make install`, which installs the [tasks] extra)"


@dataclass
class OfflineTaskConfig:
    # score every model on `heldout_continuation` (below): multiple-choice continuation of held-out passages
    enabled: bool = True
    docs: int = 100  # questions, at most (each from a different stretch of the validation text)
    context_words: int = 24  # words of the passage the model is given
    continuation_words: int = 6  # words of each choice: the true next words, or those of another passage
    choices: int = 4  # choices per question (chance accuracy = 1 / choices)

    def check(self) -> list[str]:
        problems = []
        for key in ("docs", "context_words", "continuation_words"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: {getattr(self, key)} must be at least 1")
        if self.choices < 2:
            problems.append(f"choices: {self.choices} must be at least 2")
        return problems


def available() -> str | None:
    """None when lm-eval can be used, else why not."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return f"lm-eval is not installed ({INSTALL})"
    return None


def is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def task_file_name(path: str | Path) -> str | None:
    """The `task:` name a task YAML file declares (None if it declares none)."""
    try:
        # lm-eval task files may use tags such as !function; only the top-level name matters here
        loader = type("L", (yaml.SafeLoader,), {})
        loader.add_multi_constructor("!", lambda loader, suffix, node: None)
        doc = yaml.load(Path(path).expanduser().read_text(), Loader=loader)
    except (OSError, yaml.YAMLError):
        return None
    return doc.get("task") if isinstance(doc, dict) and isinstance(doc.get("task"), str) else None


def check_names(tasks: list[str]) -> list[str]:
    """Recipe problems with `evaluate.lm_eval_tasks`, as far as they can be known before running: task files
    that are missing or name no task, and (when lm-eval is installed) names that no lm-eval task has."""
    problems = []
    names = []
    for i, name in enumerate(tasks):
        if is_task_file(name):
            if not Path(name).expanduser().is_file():
                problems.append(f"lm_eval_tasks[{i}]: task file '{name}' does not exist")
            elif task_file_name(name) is None:
                problems.append(f"lm_eval_tasks[{i}]: '{name}' has no top-level `task: <name>`; "
                                "see lm-eval's docs/new_task_guide.md")
        else:
            names.append((i, name))
    if names and available() is None:
        known = task_manager([]).all_tasks  # lm-eval's own tasks and groups (indexing them takes seconds)
        import difflib

        for i, name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                problems.append(f"lm_eval_tasks[{i}]: '{name}' is not an lm-eval task{hint}; list them with "
                                "`lm_eval ls tasks`, or give the path of a task .yaml file")
    return problems


def task_manager(include: list[Path], defaults: bool = True):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include] or None, include_defaults=defaults)


def _choose(rng: random.Random, truth: str, pool: list[tuple[int, str]], own: int, k: int,
            several: bool) -> list[str] | None:
    """`k` distinct distractors from `pool` ((source, text) pairs), from other sources than `own` when
    `several` sources exist; None when there are not enough."""
    out = []
    for source, text in rng.sample(pool, len(pool)):
        if (source != own or not several) and text != truth and text not in out:
            out.append(text)
        if len(out) == k:
            return out
    return None


def _question(rng, n: int, context: str, truth: str, distractors: list[str]) -> dict:
    label = rng.randrange(len(distractors) + 1)
    return {"id": n, "context": context, "choices": distractors[:label] + [truth] + distractors[label:],
            "label": label}


def continuation_docs(passages: list[str], cfg: OfflineTaskConfig, seed: int) -> list[dict]:
    """Questions from text: `context_words` of a passage; choices: its next `continuation_words` words and
    the words at a random place of other passages."""
    need = cfg.context_words + cfg.continuation_words
    # every non-overlapping stretch of `need` words is a candidate question: (passage, first word)
    words = [p.split() for p in passages]
    spans = [(i, at) for i, w in enumerate(words) for at in range(0, len(w) - need + 1, need)]
    if len(spans) < cfg.choices:
        raise ValueError(f"the validation split has {len(spans)} stretch(es) of {need} words; the offline task "
                         f"needs at least {cfg.choices} (lower evaluate.task.context_words or choices)")
    rng = random.Random(seed)
    rng.shuffle(spans)
    endings = [(i, " ".join(words[i][at + cfg.context_words : at + need])) for i, at in spans]
    several = len({i for i, _ in spans}) >= cfg.choices
    docs = []
    for n, (i, at) in enumerate(spans[: cfg.docs]):
        truth = " ".join(words[i][at + cfg.context_words : at + need])
        distractors = _choose(rng, truth, endings, i, cfg.choices - 1, several)
        if distractors is not None:
            docs.append(_question(rng, n, " ".join(words[i][at : at + cfg.context_words]), truth, distractors))
    return docs


def answer_docs(pairs: list[tuple[str, str]], cfg: OfflineTaskConfig, seed: int) -> list[dict]:
    """Questions from chat data: the user's prompt; choices: its held-out answer and other conversations'."""
    if len({a for _, a in pairs}) < cfg.choices:
        raise ValueError(f"the validation split has {len(pairs)} conversation(s); the offline task needs answers "
                         f"from at least {cfg.choices} (lower evaluate.task.choices or raise data.validation_percent)")
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    pool = list(enumerate(a for _, a in pairs))
    docs = []
    for n, i in enumerate(order[: cfg.docs]):
        distractors = _choose(rng, pairs[i][1], pool, i, cfg.choices - 1, True)
        if distractors is not None:
            docs.append(_question(rng, n, pairs[i][0], pairs[i][1], distractors))
    return docs


def write_task(docs: list[dict], cfg: OfflineTaskConfig, seed: int, folder: Path, about: str) -> Path:
    """The offline task as lm-eval reads it: `<name>.yaml` pointing at `<name>.jsonl` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / f"{OFFLINE_TASK}.jsonl"
    data_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {
        "task": OFFLINE_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "seed": seed, "choices": cfg.choices,
                     "about": f"{about} (llm-pipeline); chance accuracy {1 / cfg.choices:.2f}"},
    }
    path = folder / f"{OFFLINE_TASK}.yaml"
    path.write_text("# Written by llm-pipeline's evaluate stage from the recipe's validation split.\n"
                    + yaml.safe_dump(spec, sort_keys=False))
    return path


def build_offline_task(passages: list[str], cfg: OfflineTaskConfig, seed: int, folder: Path) -> Path:
    """Write the offline task (YAML + JSONL) for text passages into `folder`; the same passages and seed give
    the same files. Raises ValueError when the passages are too few or too short."""
    return write_task(continuation_docs(passages, cfg, seed), cfg, seed, folder,
                      "multiple-choice continuation of held-out validation passages")


def offline_task(data_cfg, cfg: OfflineTaskConfig, seed: int, run_dir: Path) -> Path:
    """The offline task's YAML file for this run (written into run_dir/tasks/): continuation of validation
    passages for text data; for chat data, picking each held-out prompt's answer among other answers."""
    dsd = data.load_splits(data_cfg, seed)
    if data_cfg.format != "chat":
        texts = [t for t in dsd["validation"][data_cfg.text_column] if isinstance(t, str)]
        return build_offline_task(texts, cfg, seed, run_dir / "tasks")
    pairs = [(" ".join(m["content"] for m in messages if m.get("role") == "user"), answer)
             for messages, answer in answers.held_out(dsd, data_cfg, None)]
    return write_task(answer_docs(pairs, cfg, seed), cfg, seed, run_dir / "tasks",
                      "multiple-choice: the held-out answer to each validation prompt among other answers")


def _scores(task_result: dict) -> dict:
    """lm-eval's {"acc,none": .5, "acc_stderr,none": .05, ...} → {"acc": .5, "stderr": {"acc": .05}}."""
    out, stderr = {}, {}
    for key, value in task_result.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, _filter = key.split(",", 1)
        if metric.endswith("_stderr"):
            stderr[metric.removesuffix("_stderr")] = value if isinstance(value, (int, float)) else None
        else:
            out[metric] = value
    out["stderr"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in stderr.items()}
    return out


def run_tasks(model, tokenizer, folder: Path, tasks: list[str], include: list[Path], seed: int,
              batch_size: int = 8, limit: int | None = None, chat: bool = False) -> dict:
    """{task: {metric: value, "stderr": {metric: value}}} for every task; a task that cannot run is
    {"skipped": reason}, so the report shows it instead of dropping it. `chat`: prompts go through the
    tokenizer's chat template (lm-eval's --apply_chat_template), as for a chat recipe's models."""
    missing = available()
    if missing:
        return {t: {"skipped": missing} for t in tasks}
    from lm_eval import simple_evaluate

    names = [task_file_name(t) or t if is_task_file(t) else t for t in tasks]
    include = sorted({*include, *(Path(t).expanduser().resolve().parent for t in tasks if is_task_file(t))})
    # lm-eval's own task index only when a standard task is asked for: indexing it takes seconds
    manager = task_manager(include, defaults=any(not is_task_file(t) for t in tasks if t != OFFLINE_TASK))
    lm = formats.lm_eval_model(model, tokenizer, folder, batch_size)
    out = {}
    for name in names:  # one at a time, so a task whose data is out of reach skips alone
        try:
            results = simple_evaluate(model=lm, tasks=[name], task_manager=manager, log_samples=False,
                                      limit=None if name == OFFLINE_TASK else limit,  # the task sets its size
                                      bootstrap_iters=1000, apply_chat_template=chat, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        except Exception as err:  # no network for the task's data, a broken task file, ...
            log.warning("evaluate: lm-eval task %s could not run on %s (%s); skipping it", name, folder.name, err)
            out[name] = {"skipped": f"{type(err).__name__}: {str(err)[:300]}"}
            continue
        for task, result in (results or {}).get("results", {}).items():
            out[task] = _scores(result)
            log.info("evaluate: %s %s %s", folder.name, task,
                     ", ".join(f"{k} {v:.3f}" for k, v in out[task].items() if k != "stderr"))
    return out


def main_metric(scores: dict) -> str | None:
    """The metric a table shows for a task: acc, else the first one."""
    metrics = [k for k in scores if k not in ("stderr", "skipped")]
    return "acc" if "acc" in metrics else (metrics[0] if metrics else None)
