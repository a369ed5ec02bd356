"""Task-level evaluation: the offline lm-eval task, the user's own task files, skipped tasks, recipe errors."""
import json
import sys

import pytest
import yaml

from pipeline import data, models, tasks
from pipeline.cli import main

FAST_EVAL = {"speed": False, "samples": False}


def _run_dir(tmp_path, name="tiny"):
    return tmp_path / "runs" / name


def test_offline_task_is_deterministic_from_the_seed(tmp_path):
    passages = [t for t in data.load_splits(data.DataConfig(), 42)["validation"]["text"]]
    cfg = tasks.OfflineTaskConfig(docs=30)
    a = tasks.build_offline_task(passages, cfg, 42, tmp_path / "a")
    b = tasks.build_offline_task(passages, cfg, 42, tmp_path / "b")
    c = tasks.build_offline_task(passages, cfg, 7, tmp_path / "c")
    rows = [json.loads(line) for line in a.with_suffix(".jsonl").read_text().splitlines()]
    assert a.with_suffix(".jsonl").read_text() == b.with_suffix(".jsonl").read_text()
    assert a.with_suffix(".jsonl").read_text() != c.with_suffix(".jsonl").read_text()
    assert len(rows) == 30
    text = " ".join(" ".join(p.split()) for p in passages)
    for row in rows:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
        # the right choice is what really follows the context in the validation text
        assert f"{row['context']} {row['choices'][row['label']]}" in text
    assert len({r["label"] for r in rows}) > 1  # the answer is not always in the same place
    spec = yaml.safe_load(a.read_text())
    assert spec["dataset_path"] == "json" and spec["dataset_kwargs"]["data_files"]["test"].endswith(".jsonl")
    with pytest.raises(ValueError, match="needs at least 4"):
        tasks.build_offline_task(["too short"], cfg, 42, tmp_path / "d")


def test_offline_task_on_a_tiny_model_and_an_openvino_folder_lands_in_report_and_card(tiny_models, make_recipe,
                                                                                       tmp_path):
    path = make_recipe(tiny_models["llama"], finetune={"enabled": False}, distill={"enabled": False},
                       quantize={"candidates": [{"method": "openvino-int8"}]}, evaluate=FAST_EVAL)
    assert main(["run", str(path)]) == 0
    run = _run_dir(tmp_path)
    assert models.is_openvino(run / "quantize")
    report = json.loads((run / "report.json").read_text())
    for row in report["models"]:
        scores = row["tasks"][tasks.OFFLINE_TASK]
        assert 0 <= scores["acc"] <= 1 and 0 <= scores["acc_norm"] <= 1, row["name"]
        assert 0 < scores["stderr"]["acc"] < 0.1  # 100 questions
    md = (run / "report.md").read_text()
    assert "heldout_continuation acc |" in md
    base, quant = report["models"]
    # int8 weights of the same model mostly pick the same choices
    assert abs(base["tasks"][tasks.OFFLINE_TASK]["acc"] - quant["tasks"][tasks.OFFLINE_TASK]["acc"]) <= 0.1
    card = (run / "quantize" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    results = meta["model-index"][0]["results"]
    task_result = next(r for r in results if r["dataset"]["name"] == tasks.OFFLINE_TASK)
    assert task_result["metrics"][0] == {"type": "acc", "value": round(quant["tasks"][tasks.OFFLINE_TASK]["acc"], 4),
                                         "name": pytest.approx(task_result["metrics"][0]["name"])}
    # a user re-runs the task by hand from the files in the run folder with lm-eval's own TaskManager
    spec = yaml.safe_load((run / "tasks" / "heldout_continuation.yaml").read_text())
    assert spec["task"] == tasks.OFFLINE_TASK
    assert tasks.OFFLINE_TASK in tasks.task_manager([run / "tasks"], defaults=False).all_tasks


def test_own_task_file_runs_and_unreachable_ones_are_skipped_with_the_reason(tiny_models, tmp_path):
    model, tok = models.load_folder(tiny_models["gpt2"])
    rows = [{"q": "The list", "choices": ["is a sequence", "zzzz qqqq"], "label": 0}] * 4
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({
        "task": "my_task", "dataset_path": "json", "output_type": "multiple_choice", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "mine.jsonl")}},
        "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}]}))
    broken = tmp_path / "broken.yaml"  # its data file does not exist: this task alone is skipped
    broken.write_text(own.read_text().replace("my_task", "broken_task").replace("mine.jsonl", "gone.jsonl"))
    out = tasks.run_tasks(model, tok, tiny_models["gpt2"], [str(own), str(broken)], [], seed=0)
    assert out["my_task"]["acc"] in (0.0, 1.0)  # four copies of one question: all right or all wrong
    assert "skipped" in out["broken_task"] and "gone.jsonl" in out["broken_task"]["skipped"]


def test_without_lm_eval_every_task_is_reported_skipped(tiny_models, make_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    path = make_recipe(tiny_models["gpt2"], finetune={"enabled": False}, distill={"enabled": False},
                       quantize={"enabled": False}, evaluate=FAST_EVAL)
    assert main(["run", str(path)]) == 0
    row = json.loads((_run_dir(tmp_path) / "report.json").read_text())["models"][0]
    assert "lm-eval is not installed" in row["tasks"][tasks.OFFLINE_TASK]["skipped"]
    md = (_run_dir(tmp_path) / "report.md").read_text()
    assert "| skipped |" in md and "`heldout_continuation` skipped for base: lm-eval is not installed" in md


def test_unknown_task_names_and_bad_task_files_are_recipe_errors(tiny_models, make_recipe, tmp_path, capsys):
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("dataset_path: json\n")
    path = make_recipe(tiny_models["gpt2"], evaluate={
        "lm_eval_tasks": ["hellaswag", "lambada_openaii", str(tmp_path / "missing.yaml"), str(nameless)]})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'lambada_openaii' is not an lm-eval task (did you mean lambada_openai" in err
    assert "hellaswag" not in err  # a real task name passes; its data is only fetched when it runs
    assert "missing.yaml' does not exist" in err and "has no top-level `task: <name>`" in err
    assert main(["validate", str(path), "evaluate.lm_eval_tasks=[]", "evaluate.task.choices=1"]) == 2
    assert "evaluate.task.choices: 1 must be at least 2" in capsys.readouterr().err
