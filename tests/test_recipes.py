"""Recipes: every shipped recipe validates; bad recipes fail at once, with exit code 2, naming the key."""
from pathlib import Path

import pytest

from pipeline import models, qat, recipe
from pipeline.cli import main
from pipeline.config import RecipeError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_folder_is_not_empty():
    assert {"quickstart.yaml", "gpt2-wikitext2.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    loaded = recipe.load(path)
    assert loaded.name == path.stem
    text = path.read_text()
    assert text.startswith("#") and "python -m pipeline run" in text.split("\n\n")[0], "header must say how to run it"


def test_all_problems_reported_at_once(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: ./no-such-model\n"
        "data: {block_size: 2, source: ./missing.txt}\n"
        "finetune: {max_step: 3, learning_rate: fast}\n"
        "quantize: {candidates: [{method: gptq}]}\n"
        "evaluate: {context: 64, stride: 128}\n"
        "colour: blue\n"
    )
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    for needle in ["model:", "data.block_size", "data.source", "finetune.max_step: unknown key (did you mean 'max_steps'?)",
                   "finetune.learning_rate: expected float", "quantize.candidates[0].method: 'gptq' is not allowed; use one of: bnb-int8",
                   "evaluate.stride", "colour: unknown key"]:
        assert needle in err, needle
    assert "8 problem(s)" in err


def test_overrides_apply_and_are_typed(tiny_models, make_recipe):
    path = make_recipe(tiny_models["gpt2"])
    r = recipe.load(path, ["finetune.max_steps=3", "distill.layers=[0, 3]", "evaluate.max_tokens=null"])
    assert r.finetune.max_steps == 3 and r.distill.layers == [0, 3] and r.evaluate.max_tokens is None
    with pytest.raises(RecipeError) as err:
        recipe.load(path, ["finetune.max_steps=many", "distill.every"])
    assert "finetune.max_steps" in str(err.value)


def test_run_with_bad_override_exits_2_before_loading(tiny_models, make_recipe, capsys):
    assert main(["run", str(make_recipe(tiny_models["gpt2"])), "quantize.method=awq"]) == 2
    assert "quantize.method" in capsys.readouterr().err


def test_unknown_stage_is_a_clear_error(tiny_models, make_recipe, capsys):
    assert main(["run", str(make_recipe(tiny_models["gpt2"])), "--stages", "finetune,polish"]) == 2
    assert "unknown stage(s) polish" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["run", "--stages", ""], ["run", "--stages", "load,,finetune"], ["run", "--until", " "],
                                  ["push", "--stages", "", "--dry-run"]])
def test_an_empty_stage_name_is_refused_not_read_as_every_stage(tiny_models, make_recipe, capsys, argv, tmp_path):
    # `--stages ""` (an empty shell variable) ran every enabled stage; `--until ""` ran them all as well
    command, *rest = argv
    with pytest.raises(SystemExit) as exit_:
        main([command, str(make_recipe(tiny_models["gpt2"])), f"output_dir={tmp_path / 'runs'}", *rest])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "names no stage" in err or "has an empty stage name" in err, err
    assert not (tmp_path / "runs").exists()


def test_until_takes_a_stage_name_with_spaces_around_it_as_stages_does(tiny_models, make_recipe, tmp_path):
    # `--until " load"` (a quoted list pasted with its space) was refused as an unknown stage, `--stages " load"` ran
    runs = tmp_path / "runs"
    assert main(["run", str(make_recipe(tiny_models["gpt2"])), f"output_dir={runs}", "--until", " load "]) == 0
    assert sorted(p.name for p in (runs / "tiny").iterdir() if p.is_dir()) == ["base"]  # the load stage's folder


def test_missing_recipe_file(capsys):
    assert main(["validate", "recipes/nope.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_recipe_path_that_is_a_folder_or_not_utf8_text(tmp_path, capsys):
    # a folder read as "does not exist"; a binary or Latin-1 file ended in a UnicodeDecodeError ("a bug", exit 1)
    assert main(["validate", str(tmp_path)]) == 2
    assert "is a folder; give a recipe's .yaml file" in capsys.readouterr().err
    for name, raw in [("latin1.yaml", "name: caf\xe9\nmodel: m\n".encode("latin-1")), ("bin.yaml", bytes(range(128, 256)))]:
        (tmp_path / name).write_bytes(raw)
        assert main(["validate", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "not a text file in UTF-8" in err and "Traceback" not in err, err
    (tmp_path / "bom.yaml").write_bytes("\ufeffname: x\nmodel: m\n".encode("utf-8"))  # a BOM is still UTF-8
    assert main(["validate", str(tmp_path / "bom.yaml")]) == 0


def test_a_tab_indent_names_its_line_and_the_fix(tiny_models, tmp_path, capsys):
    path = tmp_path / "tab.yaml"
    path.write_text(f"model: {tiny_models['llama']}\nfinetune:\n\tmax_steps: 2\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML (line 3 has a tab where YAML takes only spaces: indent with spaces)" in err, err


@pytest.mark.parametrize("override, needle", [
    # a nested data section names its own bad key, not "expected DataConfig or null" with the whole mapping
    ("distill.data.mix=[{source: stdlib, weight: -1}]", "distill.data.mix[0].weight: -1.0 must be positive"),
    ("prune.data={sourc: stdlib}", "prune.data.sourc: unknown key (did you mean 'source'?)"),
    ("prune.axes=mlp", "write a list, e.g. [mlp]"),
    ("=3", "'' is not a key"),
    ("prune..axes=[mlp]", "'prune..axes' is not a key"),
    ("evaluate.prompts=['The list', ' ']", "evaluate.prompts[1]: ' ' is empty"),
    # the run folder must be a folder of its own in output_dir: not output_dir itself, nor one outside it
    ("name=..", "name: '..' is not a folder name"),
    ("name=.", "name: '.' is not a folder name"),
    ("name=../elsewhere", "use one name without '/'"),
    ("name=team/run", "name: 'team/run' is not a folder name"),
    # a null or wrong type is said once; the checks that read the key see its default (they crashed on None)
    ("output_dir=null", "output_dir: expected str, got None"),
    ("data.source=null", "data.source: expected str, got None"),
    ("data.mix=[null]", "data.mix[0].source: required key is missing"),
    ("data.mix=[{source: null}]", "data.mix[0].source: expected str, got None"),
])
def test_bad_override_names_the_key_and_the_fix(tiny_models, make_recipe, capsys, override, needle):
    assert main(["validate", str(make_recipe(tiny_models["llama"])), override]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert "1 problem(s)" in err, err  # one mistake, one message


def test_a_null_name_is_the_file_name(tiny_models, make_recipe, capsys):
    path = make_recipe(tiny_models["llama"], name="my-run")
    assert main(["validate", str(path), "name=null"]) == 0
    assert f"run folder {path.parent / 'runs' / 'my-run'}" in capsys.readouterr().out


def test_bad_prune_axes_do_not_also_report_an_unreachable_target(tiny_models, make_recipe, capsys):
    assert main(["validate", str(make_recipe(tiny_models["llama"])), "prune.enabled=true", "prune.target_params=0.8",
                 "prune.axes=[mlp, width]"]) == 2
    err = capsys.readouterr().err
    assert "prune.axes[1]: 'width' is not allowed" in err and "cannot be reached" not in err


# --- the third round: nothing the user asked for is silently dropped ---------------------------------------

def test_a_key_given_twice_is_an_error_naming_both_lines(tiny_models, tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text(f"model: {tiny_models['llama']}\nfinetune:\n  max_steps: 2\n  batch_size: 4\n  max_steps: 5000\n"
                    "quantize:\n  candidates:\n    - {method: bnb-int8, method: bnb-nf4}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "finetune.max_steps: given twice (lines 3 and 5)" in err
    assert "quantize.candidates[0].method: given twice (lines 8 and 8)" in err and "2 problem(s)" in err


@pytest.mark.parametrize("override, needle", [
    ("distill.every=3", "distill.every and keep: set only one of them"),
    ("distill.every=3 distill.layers=[0,2]", "distill.every and layers: set only one of them"),
])
def test_distill_keys_that_cannot_both_take_effect_are_refused(tiny_models, make_recipe, capsys, override, needle):
    base = ["distill.keep=2"] if "layers" not in override else []
    assert main(["validate", str(make_recipe(tiny_models["llama"])), *base, *override.split()]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--until", "prune"], ["--stages", "finetune,prune"]])
def test_naming_a_disabled_stage_is_an_error_not_a_different_run(tiny_models, make_recipe, tmp_path, capsys, flags):
    assert main(["run", str(make_recipe(tiny_models["llama"])), *flags]) == 2  # prune is off by default
    err = capsys.readouterr().err
    assert f"{flags[0]} names prune, which the recipe disables (prune.enabled: false)" in err
    assert "prune.enabled=true" in err and not (tmp_path / "runs" / "tiny" / "base").exists()  # nothing ran


def test_an_already_quantized_input_is_named_at_validation(tiny_models, make_recipe, tmp_path, capsys):
    import torch

    from pipeline import quant_backends as qb

    for method in ("bnb-int8", "openvino-int8"):
        folder = tmp_path / method
        cand = qb.Candidate(method)
        qb.save(qb.quantize(cand, tiny_models["llama"], torch.device("cpu")), folder, cand)
        assert main(["validate", str(make_recipe(tiny_models["llama"])), f"quantize.input={folder}"]) == 2
        err = capsys.readouterr().err
        kind = {"bnb-int8": "bitsandbytes", "openvino-int8": "openvino"}[method]
        assert f"quantize.input: '{folder}' is already quantized ({kind} weights)" in err, err


@pytest.mark.parametrize("where, needle", [("{tmp}/a-file/runs", "a-file' is a file"),
                                           ("/proc/llm-pipeline-runs", "a folder cannot be made in '/proc'"),
                                           ("/sys/llm-pipeline-runs", "'/sys'")])
def test_validate_sees_an_output_dir_run_would_refuse(tiny_models, make_recipe, tmp_path, capsys, where, needle):
    """The folders tests/test_errors.py's FS_CASES show `run` refusing: `validate` refuses them too, and leaves
    nothing behind (root passes the permission check; /proc and /sys refuse new folders anyway)."""
    (tmp_path / "a-file").write_text("x")
    out = where.format(tmp=tmp_path)
    assert main(["validate", str(make_recipe(tiny_models["llama"])), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "output_dir: cannot write" in err and needle in err, err
    assert not Path(out).exists() and not list(tmp_path.glob(".pipeline-write-test-*"))


# Every pair of keys that cannot both take effect (pipeline/ignored.py's table, and the stage lists): (case id,
# overrides over a tiny recipe, what the message must say). Each names the ignored key, the key that makes it so
# with its value, and the fix.
NO_SAMPLE = "evaluate.generation"
IGNORED_CASES = [
    ("lora-settings-with-full-fine-tuning", ["finetune.lora.r=16"],
     ["finetune.lora.r: has no effect while finetune.method is full", "set finetune.method: lora"]),
    ("qlora-settings-with-lora", ["finetune.method=lora", "finetune.qlora.quant_type=fp4"],
     ["finetune.qlora.quant_type: has no effect while finetune.method is lora", "set finetune.method: qlora"]),
    ("qat-settings-with-qat-off-by-default", ["finetune.qat.bits=8", "finetune.qat.group_size=32"],
     ["finetune.qat.bits (and finetune.qat.group_size): have no effect while finetune.qat.enabled is false (the "
      "default); set finetune.qat.enabled: true"]),
    pytest.param(["finetune.qat.enabled=true", "finetune.qat.group_size=16",
                        "finetune.qat.fake_quant_after_n_steps=12"],
                 ["finetune.qat.fake_quant_after_n_steps: has no effect while finetune.max_steps is 12: no step would "
                  "train on the grid"], id="qat-starting-after-the-last-step",
                 marks=pytest.mark.skipif(qat.missing(), reason="torchao is not installed")),
    ("epochs-with-max-steps", ["finetune.epochs=3"],
     ["finetune.epochs: has no effect while finetune.max_steps is 12", "set finetune.max_steps: -1"]),
    ("warmup-with-a-constant-schedule", ["distill.lr_scheduler=constant", "distill.warmup_ratio=0.1"],
     ["distill.warmup_ratio: has no effect while distill.lr_scheduler is constant", "constant_with_warmup"]),
    ("evaluation-after-the-last-step", ["finetune.eval_steps=20"],
     ["finetune.eval_steps: has no effect while finetune.max_steps is 12: training ends before the first evaluation"]),
    ("checkpoint-after-the-last-step", ["distill.save_steps=50"],
     ["distill.save_steps: has no effect while distill.max_steps is 12: training ends before the first checkpoint"]),
    ("checkpoint-limit-without-checkpoints", ["finetune.save_steps=null", "finetune.save_total_limit=5"],
     ["finetune.save_total_limit: has no effect while finetune.save_steps is null"]),
    pytest.param(["finetune.precision=fp16"],
                 ["finetune.precision: has no effect while this machine trains on the CPU", "fp16 would train in fp32",
                  "use finetune.precision: bf16"], id="fp16-on-the-cpu",
                 marks=pytest.mark.skipif(models.pick_device().type != "cpu", reason="fp16 works on accelerators")),
    ("prune-settings-with-prune-off-by-default", ["prune.target_params=0.8"],
     ["prune.target_params: has no effect while prune.enabled is false (the default); set prune.enabled: true"]),
    ("fraction-settings-with-explicit-sizes", ["prune.enabled=true", "prune.num_hidden_layers=2", "prune.axes=[depth]",
                                               "prune.count_embeddings=true"],
     ["prune.axes (and prune.count_embeddings): have no effect while prune.target_params is not set"]),
    ("round-to-without-a-width-axis", ["prune.enabled=true", "prune.target_params=0.8", "prune.axes=[depth]",
                                       "prune.round_to=16"],
     ["prune.round_to: has no effect while prune.axes is ['depth']"]),
    ("mlp-ranking-and-refit-without-a-width-cut", ["prune.enabled=true", "prune.num_hidden_layers=2",
                                                   "prune.mlp_importance=activation", "prune.refit=false"],
     ["prune.mlp_importance: has no effect while prune.intermediate_size is not set: no MLP channel is cut",
      "prune.refit: has no effect while the prune cut changes no width"]),
    ("calibration-for-magnitude-sparsity", ["prune.enabled=true", "prune.sparsity.amount=0.5",
                                            "prune.sparsity.method=magnitude", "prune.calibration_blocks=8"],
     ["prune.calibration_blocks: has no effect while prune.sparsity.method is magnitude"]),
    ("sparsity-settings-without-sparsity", ["prune.enabled=true", "prune.num_hidden_layers=2",
                                            "prune.sparsity.method=magnitude"],
     ["prune.sparsity.method: has no effect while prune.sparsity.amount is 0 and pattern is unstructured"]),
    ("student-layers-with-prune", ["prune.enabled=true", "prune.intermediate_size=64", "distill.keep=2"],
     ["distill.keep: has no effect while prune.enabled is true: the student is the pruned model",
      "set prune.enabled: false"]),
    ("kd-settings-without-kd", ["distill.alpha_kd=0", "distill.temperature=3", "distill.kl=reverse",
                                "distill.teacher_precision=fp32"],
     ["distill.kl (and distill.temperature): have no effect while distill.alpha_kd is 0",
      "distill.teacher_precision: has no effect while distill.alpha_kd and alpha_cos are 0: the teacher never runs"]),
    ("a-teacher-that-never-runs", ["prune.enabled=true", "prune.intermediate_size=64", "distill.alpha_kd=0",
                                   "distill.teacher={llama}"],
     ["distill.teacher: has no effect while distill.alpha_kd and alpha_cos are 0 and prune.enabled is true: the "
      "student is the pruned model: the teacher neither runs", "remove distill.teacher"]),
    ("a-calibration-set-nncf-does-not-read",
     ["quantize.candidates=[{method: openvino-int4, calibration_samples: 16, calibration_tokens: 64}]"],
     ["quantize.candidates[0].calibration_samples (and quantize.candidates[0].calibration_tokens): have no effect "
      "while quantize.candidates[0] (openvino-int4) has no awq, scale_estimation, gptq or lora_correction, and",
      "ratio is 1", "add awq: true"]),
    ("calibration-tokens-without-calibration",
     ["quantize.candidates=[{method: openvino-int4, calibration_tokens: 64}]"],
     ["quantize.candidates[0].calibration_tokens: has no effect while quantize.candidates[0] (openvino-int4) is "
      "not data-aware", "add calibration_samples"]),
    ("general-budget-without-general-text", ["general.tokens=0", "quantize.max_general_ppl_increase=5"],
     ["quantize.max_general_ppl_increase: has no effect while general.tokens is 0"]),
    ("over-budget-inputs-without-budget", ["quantize.max_ppl_increase=null", "quantize.try_over_budget_inputs=true"],
     ["quantize.try_over_budget_inputs: has no effect while no quality budget is set"]),
    ("beams-without-beam-search", [f"{NO_SAMPLE}.num_beams=3"],
     ["evaluate.generation.num_beams: has no effect while evaluate.generation.strategy is greedy"]),
    ("sampling-settings-with-beam-search", [f"{NO_SAMPLE}.strategy=beam", f"{NO_SAMPLE}.top_k=5"],
     ["evaluate.generation.top_k: has no effect while evaluate.generation.strategy is beam"]),
    ("answer-settings-with-text-data", ["evaluate.answer_tokens=10"],
     ["evaluate.answer_tokens: has no effect while data.format is text"]),
    ("hub-settings-of-local-data", ["data.split=test", "data.validation_split=v"],
     ["data.split (and data.validation_split): have no effect while data.source is stdlib"]),
    ("held-out-share-with-a-validation-split", ["data.source=wikitext", "data.validation_split=validation",
                                                "data.validation_percent=5"],
     ["data.validation_percent: has no effect while data.validation_split is 'validation'"]),
    ("chat-settings-of-text-data", ["data.chat_template=x", "data.prompt_column=q"],
     ["data.chat_template (and data.prompt_column): have no effect while data.format is text"]),
    ("bad-rows-of-text-data", ["data.bad_rows=drop"], ["data.bad_rows: has no effect while data.format is text"]),
    ("own-text-settings-while-off", ["distill.own_text.weight=0.5"],
     ["distill.own_text.weight: has no effect while distill.own_text.tokens is 0"]),
    ("text-column-of-chat-data", ["data.format=chat", "data.chat_template={{ messages }}", "data.text_column=body"],
     ["data.text_column: has no effect while data.format is chat"]),
    ("messages-and-prompt-columns", ["data.format=chat", "data.chat_template={{ messages }}", "data.messages_column=conv",
                                     "data.prompt_column=q"],
     ["data.prompt_column: has no effect while data.messages_column is 'conv'"]),
    ("hub-split-of-a-local-mix-source", ["data.mix=[{source: stdlib, split: test}]"],
     ["data.mix[0].split: has no effect while data.mix[0].source is stdlib"]),
    ("hub-settings-of-a-stage-s-local-data", ["prune.enabled=true", "prune.intermediate_size=64",
                                              "prune.data={config: x}"],
     ["prune.data.config: has no effect while prune.data.source is stdlib"]),
    ("a-validation-split-prune-does-not-read", ["prune.enabled=true", "prune.intermediate_size=64",
                                                "prune.data={source: wikitext, validation_split: test}"],
     ["prune.data.validation_split: has no effect while prune calibrates on the training split only"]),
    ("a-block-cap-prune-does-not-read", ["prune.enabled=true", "prune.intermediate_size=64",
                                         "prune.data={max_train_blocks: 4}"],
     ["prune.data.max_train_blocks: has no effect while prune.data.mix is empty"]),
    ("a-validation-split-distill-does-not-read", ["distill.data={source: wikitext, validation_split: test}"],
     ["distill.data.validation_split: has no effect while distill.eval_steps is null"]),
    ("continuation-settings-of-the-chat-task", ["data.format=chat", "data.chat_template={{ messages }}",
                                                "evaluate.task.context_words=12"],
     ["evaluate.task.context_words: has no effect while data.format is chat"]),
    ("a-limit-for-no-lm-eval-task", ["evaluate.lm_eval_limit=10"],
     ["evaluate.lm_eval_limit: has no effect while evaluate.lm_eval_tasks is empty", "task.docs"]),
    ("a-namespace-the-repo-names-itself", ["push.repo=org/{recipe}-{stage}", "push.user=me"],
     ["push.user: has no effect while push.repo 'org/{recipe}-{stage}' names its namespace itself",
      "put {user} in push.repo"]),
    ("evaluating-a-stage-the-recipe-disables", ["evaluate.models=[base, prune]"],
     ["evaluate.models[1]: 'prune' is not a model this recipe makes (prune.enabled is false)"]),
    ("pushing-a-stage-the-recipe-disables", ["push.stages=[finetune, prune]"],
     ["push.stages[1]: 'prune' is not a model this recipe makes (prune.enabled is false)"]),
]


@pytest.mark.parametrize("overrides, needles", [pytest.param(*c[1:], id=c[0]) if isinstance(c[0], str) else c
                                                for c in IGNORED_CASES])
def test_keys_that_would_not_take_effect_are_refused(tiny_models, make_recipe, capsys, overrides, needles):
    overrides = [o.replace("{llama}", str(tiny_models["llama"])) for o in overrides]
    assert main(["validate", str(make_recipe(tiny_models["llama"])), *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    problems = sum("no effect while" in n or "is not a model" in n for n in needles)
    assert f"{problems} problem(s)" in err, err  # nothing else is said about these keys


# A key left at its default contradicts nothing; a feature switched off in writing keeps its settings for later.
ACCEPTED_CASES = [
    ("defaults-written-out", ["finetune.lora.r=8", "finetune.qlora.quant_type=nf4", f"{NO_SAMPLE}.temperature=0.8",
                              "prune.round_to=32", "data.split=train"]),
    ("a-stage-switched-off", ["prune.enabled=false", "prune.target_params=0.8", "distill.enabled=false",
                              "distill.lr_scheduler=constant", "distill.warmup_ratio=0.1"]),
    ("qat-switched-off", ["finetune.qat.enabled=false", "finetune.qat.bits=8"]),
    # the other side of the rows above: the same keys where they take effect
    ("keys-where-they-take-effect", ["push.repo=x-{stage}", "push.user=me",
                                     "quantize.candidates=[{method: openvino-int4, awq: true, calibration_samples: 16},"
                                     " {name: mixed, method: openvino-int4, ratio: 0.8, calibration_samples: 16}]"]),
    ("samples-speed-and-answers-switched-off", ["evaluate.samples=false", f"{NO_SAMPLE}.num_beams=3",
                                                "evaluate.speed=false", "evaluate.repeats=5", "evaluate.answers=false",
                                                "evaluate.answer_tokens=10"]),
]


@pytest.mark.parametrize("overrides", [c[1] for c in ACCEPTED_CASES], ids=[c[0] for c in ACCEPTED_CASES])
def test_defaults_and_switched_off_settings_are_accepted(tiny_models, make_recipe, capsys, overrides):
    assert main(["validate", str(make_recipe(tiny_models["llama"])), *overrides]) == 0, capsys.readouterr().err


def test_student_layers_for_a_pruned_input_are_refused(tiny_models, make_recipe, tmp_path, capsys):
    """distill.input naming a pruned folder makes that folder the student, as prune.enabled does."""
    import shutil

    from pipeline.folders import write_record
    from pipeline.records import StageRecord

    pruned = tmp_path / "pruned"
    shutil.copytree(tiny_models["llama"], pruned)
    write_record(pruned, StageRecord(stage="prune", recipe="other", fingerprint="x", parent=str(tiny_models["llama"])))
    assert main(["validate", str(make_recipe(tiny_models["llama"])), f"distill.input={pruned}", "distill.every=2"]) == 2
    err = capsys.readouterr().err
    assert f"distill.every: has no effect while distill.input '{pruned}' is a pruned model" in err, err


def test_every_contradiction_is_listed_at_once(tiny_models, make_recipe, capsys):
    assert main(["validate", str(make_recipe(tiny_models["llama"])), "finetune.lora.r=16", "finetune.epochs=2",
                 "prune.target_params=0.8", "distill.alpha_kd=0", "distill.kl=reverse", "data.split=test",
                 f"{NO_SAMPLE}.top_p=0.5", "finetune.max_steps=many"]) == 2
    err = capsys.readouterr().err
    for key in ("finetune.lora.r", "prune.target_params", "distill.kl", "data.split", "evaluate.generation.top_p",
                "finetune.max_steps: expected int"):
        assert key in err, (key, err)
    assert "finetune.epochs" not in err  # max_steps is wrong: its own message, not also a contradiction
    assert "6 problem(s)" in err, err


def test_a_stage_input_without_a_tokenizer_is_refused_at_validation(tiny_models, make_recipe, tmp_path, capsys):
    """As the recipe's model is: transformers would build an empty default tokenizer for it (run refuses it too)."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_models["llama"], bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    assert main(["validate", str(make_recipe(tiny_models["llama"])), f"distill.input={bare}",
                 f"distill.teacher={bare}", f"quantize.inputs=[{bare}]"]) == 2
    err = capsys.readouterr().err
    for key in ("distill.input", "distill.teacher", "quantize.inputs[0]"):
        assert f"{key}: model folder '{bare}' has no tokenizer" in err, (key, err)
