"""Recipes: every shipped recipe validates; bad recipes fail at once, with exit code 2, naming the key."""
from pathlib import Path

import pytest

from pipeline import recipe
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


def test_missing_recipe_file(capsys):
    assert main(["validate", "recipes/nope.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("override, needle", [
    # a nested data section names its own bad key, not "expected DataConfig or null" with the whole mapping
    ("distill.data.mix=[{source: stdlib, weight: -1}]", "distill.data.mix[0].weight: -1.0 must be positive"),
    ("prune.data={sourc: stdlib}", "prune.data.sourc: unknown key (did you mean 'source'?)"),
    ("prune.axes=mlp", "write a list, e.g. [mlp]"),
    ("=3", "'' is not a key"),
    ("prune..axes=[mlp]", "'prune..axes' is not a key"),
    ("evaluate.prompts=['The list', ' ']", "evaluate.prompts[1]: ' ' is empty"),
])
def test_bad_override_names_the_key_and_the_fix(tiny_models, make_recipe, capsys, override, needle):
    assert main(["validate", str(make_recipe(tiny_models["llama"])), override]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert "1 problem(s)" in err, err  # one mistake, one message


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


def test_validate_sees_an_output_dir_run_would_refuse(tiny_models, make_recipe, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert main(["validate", str(make_recipe(tiny_models["llama"])), f"output_dir={tmp_path}/a-file/runs"]) == 2
    err = capsys.readouterr().err
    assert "output_dir: cannot write" in err and "a-file' is a file" in err
