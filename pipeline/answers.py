"""Answer scoring for chat recipes: each model answers the held-out prompts (under its chat template) and
`evaluate` metric modules score the answers against the held-out responses.

Metric names that the repository ships (pipeline/eval_metrics/: exact_match, chrf, rouge_l) load by path,
offline; a folder holding an `evaluate` metric script loads by path too; any other name is an `evaluate`
metric on the Hub (e.g. "bleu", "bertscore"), loaded when the Hub is reachable and reported skipped when not.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from pipeline.chat import conversation
from pipeline.eval_metrics import LOCAL
from pipeline.generate import GenerationConfig, generate

log = logging.getLogger("pipeline")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
INSTALL = "pip install evaluate sacrebleu rouge_score (or `make install`, which installs the [tasks] extra)"


def check_names(names: list[str], key: str = "answer_metrics") -> list[str]:
    problems = []
    for i, name in enumerate(names):
        if name in LOCAL or HUB_NAME.match(name) and not name.startswith((".", "/", "~")):
            continue
        path = Path(name).expanduser()
        if not (path / f"{path.name}.py").is_file() and not (path.suffix == ".py" and path.is_file()):
            problems.append(f"{key}[{i}]: '{name}' is not a metric: use one of {', '.join(LOCAL)} (kept in the "
                            "repository), an `evaluate` metric folder or script, or a metric name on the Hub")
    return problems


def load_metric(name: str):
    """An `evaluate` module: by path for the repository's own and for local folders, else from the Hub."""
    import evaluate

    if name in LOCAL:
        return evaluate.load(str(LOCAL[name]))
    return evaluate.load(str(Path(name).expanduser()) if Path(name).expanduser().exists() else name)


def load_metrics(names: list[str]) -> dict:
    """{name: module} for the metrics that load; {name: reason} for those that do not (never dropped)."""
    try:
        import evaluate  # noqa: F401
    except ImportError:
        return {n: f"evaluate is not installed ({INSTALL})" for n in names}
    out = {}
    for name in names:
        try:
            out[name] = load_metric(name)
        except Exception as err:  # a Hub name offline, a missing dependency of the metric script, ...
            log.warning("evaluate: metric %s could not be loaded (%s); skipping it", name, err)
            out[name] = f"{type(err).__name__}: {str(err)[:300]}"
    return out


def held_out(dsd, data_cfg, limit: int | None) -> list[tuple[list[dict], str]]:
    """(conversation up to its last assistant turn, that turn's text) for the validation conversations."""
    out = []
    for row in dsd["validation"]:
        messages = conversation(row, data_cfg)
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last:  # an assistant turn with something before it to answer
            out.append((messages[:last], messages[last]["content"]))
    return out[:limit] if limit else out


def score(model, tokenizer, prompts: list[tuple[list[dict], str]], metrics: dict, max_new_tokens: int) -> dict:
    """{"scores": {metric: value or {"skipped": reason}}, "answers": [{prompt, reference, answer}], ...}."""
    greedy = GenerationConfig(strategy="greedy", max_new_tokens=max_new_tokens)
    answers = [generate(model, tokenizer, messages, greedy).strip() for messages, _ in prompts]
    references = [ref.strip() for _, ref in prompts]
    scores = {}
    for name, metric in metrics.items():
        if isinstance(metric, str):
            scores[name] = {"skipped": metric}
            continue
        try:
            result = metric.compute(predictions=answers, references=references)
        except Exception as err:  # a Hub metric that wants other inputs (e.g. several references each)
            scores[name] = {"skipped": f"{type(err).__name__}: {str(err)[:300]}"}
            continue
        # one number per metric: the key named like it, else the first number it returns
        numbers = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        key = next((k for k in numbers if k == name.split("/")[-1]), next(iter(numbers), None))
        scores[name] = round(float(numbers[key]), 4) if key else {"skipped": f"returned no number: {result}"}
    return {"scores": scores, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "answers": [{"prompt": m[-1]["content"], "reference": r, "answer": a}
                        for (m, r), a in zip(prompts, answers)]}
