"""Task-level evaluation: the offline lm-eval task, the user's own task files, skipped tasks, recipe errors."""
import json
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import answers, data, formats, tasks
from pipeline.cli import main
from pipeline.generate import GenerationConfig, generate

ROOT = Path(__file__).resolve().parents[1]

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
    assert formats.openvino.holds(run / "quantize")
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
    model, tok = formats.load_folder(tiny_models["gpt2"])
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


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                "{% if add_generation_prompt %}assistant:{% endif %}"
CHAT_DATA = {"source": str(ROOT / "recipes" / "data" / "python-chat.jsonl"), "format": "chat",
             "chat_template": CHAT_TEMPLATE, "validation_percent": 20, "block_size": 128}


def test_chat_recipe_scores_answers_with_evaluate_modules_loaded_by_path_for_each_stage(tiny_models, make_recipe,
                                                                                       tmp_path):
    path = make_recipe(tiny_models["llama"], data=CHAT_DATA, distill={"enabled": False},
                       quantize={"enabled": False},
                       finetune={"method": "lora", "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
                       evaluate={"models": ["base", "finetune"], "speed": False, "answer_tokens": 8,
                                 "prompts": ["What is a list?"]})
    assert main(["run", str(path)]) == 0
    run = _run_dir(tmp_path)
    report = json.loads((run / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "finetune"]
    for row in report["models"]:
        scores = row["answers"]["scores"]
        assert set(scores) == {"exact_match", "chrf", "rouge_l"}, row["name"]
        assert 0 <= scores["exact_match"] <= 1 and 0 <= scores["rouge_l"] <= 1 and 0 <= scores["chrf"] <= 100
        assert row["answers"]["prompts"] == 6 and all(a["reference"] for a in row["answers"]["answers"])
        # the offline task for chat data: each held-out prompt's answer among other conversations' answers
        assert 0 <= row["tasks"][tasks.OFFLINE_TASK]["acc"] <= 1
    md = (run / "report.md").read_text()
    assert "answers exact_match | answers chrf | answers rouge_l |" in md and "## Answers to held-out prompts" in md
    meta = yaml.safe_load((run / "finetune" / "README.md").read_text().split("---")[1])
    types = {m["type"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert {"exact_match", "chrf", "rouge_l", "acc", "perplexity"} <= types
    # the report's samples are answers under the chat template, as `generate --chat` gives them
    model, tok = formats.load_folder(run / "finetune")
    sample = report["models"][1]["samples"][0]
    cfg = GenerationConfig(max_new_tokens=4)
    assert sample["output"] == generate(model, tok, "What is a list?", cfg, chat=True)
    assert generate(model, tok, "What is a list?", cfg, chat=True) == generate(
        model, tok, [{"role": "user", "content": "What is a list?"}], cfg)


def test_a_model_that_answers_correctly_scores_exact_match_1(tiny_models):
    model, tok = formats.load_folder(tiny_models["gpt2"])
    tok.chat_template = CHAT_TEMPLATE
    prompts = [[{"role": "user", "content": q}] for q in ("What does len() return?", "How do I sort a list?")]
    cfg = GenerationConfig(max_new_tokens=6)
    # hand-made references: what this model answers itself, and a wrong answer
    right = [(p, generate(model, tok, p, cfg)) for p in prompts]
    wrong = [(p, "The number of items.") for p in prompts]
    metrics = answers.load_metrics(["exact_match", "chrf", "rouge_l", str(ROOT / "pipeline" / "eval_metrics" / "chrf")])
    good = answers.score(model, tok, right, metrics, 6)["scores"]
    bad = answers.score(model, tok, wrong, metrics, 6)["scores"]
    assert good["exact_match"] == 1.0 and good["chrf"] == 100.0
    # rouge_score counts only letters and digits: 1 for an answer with words, 0 for one of punctuation alone (what
    # a random model may generate, depending on how the transformers release initialises it)
    has_words = [any(c.isalnum() for c in answer) for _, answer in right]
    assert good["rouge_l"] == pytest.approx(sum(has_words) / len(has_words))
    assert bad["exact_match"] == 0.0 and bad["chrf"] < 50
    # the metric itself, on answers with words: exact, partial (LCS 3 of 4 words: F = 0.75) and none
    rouge = metrics["rouge_l"]
    assert rouge.compute(predictions=["a list of items"], references=["a list of items"])["rouge_l"] == 1.0
    assert rouge.compute(predictions=["a list of things"], references=["a list of items"])["rouge_l"] == \
        pytest.approx(0.75)
    assert rouge.compute(predictions=["sorted()"], references=["len"])["rouge_l"] == 0.0
    assert good[str(ROOT / "pipeline" / "eval_metrics" / "chrf")] == 100.0  # a metric folder given by path


def test_unknown_metric_is_a_recipe_error_and_an_unreachable_one_is_skipped(tiny_models, make_recipe, capsys,
                                                                           monkeypatch):
    path = make_recipe(tiny_models["gpt2"], evaluate={"answer_metrics": ["exact_match", "./no/such/metric"]})
    assert main(["validate", str(path)]) == 2
    assert "answer_metrics[1]: './no/such/metric' is not a metric" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = answers.load_metrics(["exact_match", "no-such-hub-metric"])
    assert not isinstance(loaded["exact_match"], str) and isinstance(loaded["no-such-hub-metric"], str)


def test_generate_chat_flag_applies_the_chat_template(tiny_models, tmp_path, capsys):
    model, tok = formats.load_folder(tiny_models["llama"])
    assert main(["generate", str(tiny_models["llama"]), "What is a list?", "--chat"]) == 2  # no template
    assert "no chat template" in capsys.readouterr().err
    tok.chat_template = CHAT_TEMPLATE
    model.save_pretrained(tmp_path / "chat")
    tok.save_pretrained(tmp_path / "chat")
    assert main(["generate", str(tmp_path / "chat"), "What is a list?", "--chat", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == generate(model, tok, "What is a list?", GenerationConfig(max_new_tokens=5), chat=True).strip()
    assert out != generate(model, tok, "What is a list?", GenerationConfig(max_new_tokens=5)).strip()


@pytest.mark.slow
def test_offline_task_on_smollm2_scores_the_base_model_clearly_above_chance(tmp_path):
    from pipeline.models import load_model, load_tokenizer, resolve

    source = resolve("smollm2-135m")
    model, tok = load_model(source).eval(), load_tokenizer(source)
    cfg = tasks.OfflineTaskConfig()
    path = tasks.offline_task(data.DataConfig(), cfg, 42, tmp_path)
    scores = tasks.run_tasks(model, tok, tmp_path, [tasks.OFFLINE_TASK], [path.parent], seed=42)[tasks.OFFLINE_TASK]
    chance = 1 / cfg.choices
    print(f"SmolLM2-135M base on {tasks.OFFLINE_TASK}: {scores}")  # shown with pytest -s
    # 100 questions: the standard error is about 0.05, so 0.45 is four of them above chance
    assert scores["acc"] > chance + 0.2, scores


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_task_scoring_equals_lm_evals_own_and_runs_the_head_only_where_it_scores(arch, tokenizer):
    """The offline task's model (formats.transformers.lm_eval_model) gives lm-eval's HFLM's log-likelihoods and
    greedy flags, while the output head sees only the continuation positions: on a large vocabulary that is
    most of the cost."""
    import tiny
    from lm_eval.models.huggingface import HFLM

    model = tiny.build_model(arch, tokenizer).eval()
    model.resize_token_embeddings(8192)  # a large vocabulary for a tiny model: the head dominates its cost
    texts = [("The Python interpreter reads", " the source file"), ("A list", " comprehension is short"),
             ("x", " y"), ("The with statement is used to wrap the execution of a block", " with methods")]
    ours, plain = formats.transformers.lm_eval_model(model, tokenizer, ".", 3), HFLM(pretrained=model,
                                                                                     tokenizer=tokenizer, batch_size=3)
    requests = [((c, x), tokenizer(c).input_ids, tokenizer(x).input_ids) for c, x in texts]
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(a[0].shape[:-1].numel()))
    try:
        got = ours._loglikelihood_tokens(requests)
        scored, rows[:] = sum(rows), []
        want = plain._loglikelihood_tokens(requests)
        full = sum(rows)
    finally:
        hook.remove()
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4) and g_greedy == w_greedy
    continuation = sum(len(r[2]) for r in requests)
    assert scored <= 2 * continuation < full  # at most a batch's longest continuation per row
