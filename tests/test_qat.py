"""Quantization-aware fine-tuning (finetune.qat, torchao): prepare → train → convert leaves an ordinary float
folder; the grid it trained for is recorded, and quantize says when the shipped 4-bit grid differs."""
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import qat, recipe, runner
from pipeline.cli import main
from tiny import record as _record
from tiny import run_stages

pytestmark = pytest.mark.skipif(qat.missing(), reason=f"torchao is not installed: {qat.QAT_INSTALL}")
QUIET = {"logging_steps": 1}


def _fake_quant_error(model, settings) -> float:
    """Mean relative distance of the block weights from their nearest point on the grid."""
    import copy

    probe = copy.deepcopy(model)
    qat.prepare(probe, settings)
    errors = []
    for name, module in probe.named_modules():
        if hasattr(module, "weight_fake_quantizer"):
            w = module.weight.detach()
            errors.append(((module.weight_fake_quantizer(w) - w).norm() / w.norm()).item())
    return sum(errors) / len(errors)


def test_qat_trains_on_the_grid_and_saves_plain_float_weights(tiny_models, make_recipe, tmp_path):
    text = tmp_path / "repeated.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 400)
    grid = {"bits": 4, "group_size": 16, "symmetric": False}
    path = make_recipe(tiny_models["llama"], data={"source": str(text)}, distill={"enabled": False},
                       finetune={"learning_rate": 1.0e-2, "qat": {"enabled": True, **grid}, **QUIET},
                       quantize={"enabled": False}, evaluate={"enabled": False})
    _, out = run_stages(path, ["load", "finetune"])
    rec = _record(out["finetune"])
    assert rec["qat"] == {**grid, "fake_quant_after_n_steps": 0}
    assert "fake-quantized to int4 asymmetric, groups of 16" in rec["summary"]
    m = rec["metrics"]
    assert m["train_loss_last"] < m["train_loss_first"] - 0.4, m  # it learned through the fake quantizers
    tuned = AutoModelForCausalLM.from_pretrained(out["finetune"])
    base = AutoModelForCausalLM.from_pretrained(out["load"])
    # an ordinary float checkpoint: plain nn.Linear, the base's keys and shapes, nothing of torchao
    assert not any("FakeQuantized" in type(m).__name__ for m in tuned.modules())
    assert {k: v.shape for k, v in tuned.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert tuned.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        assert (tuned(ids).logits - base(ids).logits).abs().max() > 1e-2
    # the float weights were trained through the grid: plain fine-tuning of the same steps ends farther from it
    plain = make_recipe(tiny_models["llama"], name="plain", data={"source": str(text)}, distill={"enabled": False},
                        finetune={"learning_rate": 1.0e-2, **QUIET}, quantize={"enabled": False},
                        evaluate={"enabled": False})
    plain_model = AutoModelForCausalLM.from_pretrained(run_stages(plain, ["load", "finetune"])[1]["finetune"])
    settings = qat.QatSettings(enabled=True, **grid)
    assert _fake_quant_error(tuned, settings) < _fake_quant_error(plain_model, settings)


@pytest.mark.parametrize("bits, group_size", [(4, 16), (4, 32), (3, 16)])
def test_asymmetric_grid_sits_on_the_weights(bits, group_size, tiny_models):
    """Each fake-quantized weight is within half a step of the original, a step being its group's
    (max - min) / (2^bits - 1): the asymmetric grid spans each group (torchao's default integer zero-point
    domain would shift it off)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    qat.prepare(model, qat.QatSettings(enabled=True, bits=bits, group_size=group_size, symmetric=False))
    checked = 0
    for module in model.modules():
        if hasattr(module, "weight_fake_quantizer"):
            w = module.weight.detach()
            groups = w.reshape(-1, group_size)
            step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / (2 ** bits - 1)
            error = (module.weight_fake_quantizer(w).reshape(-1, group_size) - groups).abs()
            assert (error <= step / 2 + 1e-6).all(), type(module).__name__
            checked += 1
    assert checked > 0


def test_fake_quant_after_n_steps(tiny_models, make_recipe, tmp_path):
    """The fake quantizers are off before step N and on from it (the callback reads the global step); with N
    past the last step the run is plain fine-tuning, weight for weight."""
    from types import SimpleNamespace

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    qat.prepare(model, qat.QatSettings(enabled=True, group_size=16))
    callback = qat.delayed_start(3)
    states = []
    for step in (0, 2, 3, 5):
        callback.on_step_begin(None, SimpleNamespace(global_step=step), None, model=model)
        states.append({m.weight_fake_quantizer.enabled for m in model.modules() if hasattr(m, "weight_fake_quantizer")})
    assert states == [{False}, {False}, {True}, {True}]

    text = tmp_path / "repeated.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 400)
    common = dict(data={"source": str(text)}, distill={"enabled": False}, quantize={"enabled": False},
                  evaluate={"enabled": False})
    steps = {"learning_rate": 1.0e-2, "max_steps": 4, **QUIET}
    delayed = make_recipe(tiny_models["llama"], name="late", **common,
                          finetune={**steps, "qat": {"enabled": True, "group_size": 16, "fake_quant_after_n_steps": 3}})
    plain = make_recipe(tiny_models["llama"], name="plain", **common, finetune=steps)
    # a recipe whose fake quantization starts after its last step is refused (it would be plain fine-tuning without
    # a word: tests/test_recipes.py); set on the parsed recipe, it shows that prepare and convert change no weight
    late_recipe = recipe.load(delayed)
    late_recipe.finetune.qat.fake_quant_after_n_steps = 4
    late = AutoModelForCausalLM.from_pretrained(runner.run(late_recipe, ["load", "finetune"])["finetune"])
    ref = AutoModelForCausalLM.from_pretrained(run_stages(plain, ["load", "finetune"])[1]["finetune"])
    for (name, a), b in zip(late.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert "fake_quant_after_n_steps: -1 must be 0 or more" in qat.QatSettings(fake_quant_after_n_steps=-1).check()[0]


def test_quantize_warns_when_the_shipped_grid_differs(tiny_models, make_recipe, caplog):
    path = make_recipe(tiny_models["llama"], distill={"enabled": False},
                       finetune={"max_steps": 2, "qat": {"enabled": True, "group_size": 16}},
                       quantize={"candidates": [{"method": "openvino-int4", "group_size": 32}],
                                 "max_ppl_increase": 1e6, "speed_tokens": 0},
                       evaluate={"enabled": False})
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        _, out = run_stages(path)
    rec = _record(out["quantize"])
    assert rec["qat"] == {"trained_for": {"bits": 4, "group_size": 16, "symmetric": False, "fake_quant_after_n_steps": 0},
                          "shipped": {"bits": 4, "group_size": 32, "symmetric": False}, "matches": False}
    assert any("trained for int4 asymmetric, groups of 16" in r.message for r in caplog.records)


@pytest.mark.parametrize("arch, finetune, message", [
    ("gpt2", {"qat": {"enabled": True, "group_size": 16}}, "Conv1D layers are not covered"),
    ("llama", {"method": "lora", "qat": {"enabled": True}}, "finetune.qat.enabled: quantization-aware training"),
    ("llama", {"qat": {"enabled": True, "group_size": 48}}, "group_size 48 does not divide the input width 64"),
    ("llama", {"qat": {"enabled": True, "bits": 1}}, "finetune.qat.bits: 1"),
])
def test_qat_refusals_exit_2_and_leave_no_folder(arch, finetune, message, tiny_models, make_recipe, capsys, tmp_path):
    path = make_recipe(tiny_models[arch], finetune=finetune, distill={"enabled": False}, quantize={"enabled": False},
                       evaluate={"enabled": False})
    for command in ("validate", "run"):  # said before any stage runs: the model is read from its config
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("runs/*/base")) and not list(tmp_path.glob("runs/*/finetune"))
