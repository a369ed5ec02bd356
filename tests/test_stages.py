"""Each stage on tiny real models: real training, real quantization, real numbers."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import checkpoint, data, models, recipe, runner
from pipeline.metrics import guide_perplexity, perplexity
from pipeline.stages import distill

ARCHS = ["gpt2", "llama"]


def _run(path, stages=None, overrides=()):
    r = recipe.load(path, list(overrides))
    return r, runner.run(r, stages)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _record(folder):
    return json.loads((folder / "pipeline.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_finetune_lowers_loss_and_reloads(arch, tiny_models, make_recipe):
    _, out = _run(make_recipe(tiny_models[arch]), ["load", "finetune"])
    m = _record(out["finetune"])["metrics"]
    assert m["train_steps"] == 12 and m["train_tokens"] == 12 * 8 * 64
    assert m["train_loss_last"] < m["train_loss_first"] - 0.3, m
    tuned = AutoModelForCausalLM.from_pretrained(out["finetune"])
    base = AutoModelForCausalLM.from_pretrained(out["load"])
    ids = torch.arange(1, 33).unsqueeze(0)
    assert not torch.allclose(_logits(tuned, ids), _logits(base, ids)), "fine-tuning changed nothing"


@pytest.mark.parametrize("arch", ARCHS)
def test_student_keeps_layers_and_round_trips(arch, tiny_models, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    student = distill.student_from_teacher(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    assert len(distill.decoder_layers(student)) == 2
    per_layer = sum(p.numel() for p in distill.decoder_layers(teacher)[0].parameters())
    assert models.count_params(teacher) - models.count_params(student) == 2 * per_layer
    # kept layers are copies of teacher layers 0 and 3
    t_state, s_state = distill.decoder_layers(teacher).state_dict(), distill.decoder_layers(student).state_dict()
    for key, value in s_state.items():
        idx, rest = key.split(".", 1)
        assert torch.equal(value, t_state[f"{[0, 3][int(idx)]}.{rest}"])
    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    ids = torch.arange(1, 33).unsqueeze(0)
    assert torch.equal(_logits(student, ids), _logits(reloaded, ids))
    out = student.generate(ids[:, :4], max_new_tokens=4, do_sample=False)  # KV cache indexes by layer
    assert out.shape == (1, 8)


def test_layer_maps():
    cfg = distill.DistillConfig
    assert distill.layer_map(cfg(), 12) == [0, 2, 4, 6, 8, 10]
    assert distill.layer_map(cfg(keep=4), 12) == [0, 4, 7, 11]
    assert distill.layer_map(cfg(layers=[1, 5]), 12) == [1, 5]
    with pytest.raises(Exception, match="out of range"):
        distill.layer_map(cfg(layers=[12]), 12)


def test_kd_loss_with_alpha_kd_zero_is_plain_ce(tiny_models, tokenizer):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    student = distill.student_from_teacher(teacher, [0, 2])
    ids = torch.randint(1, len(tokenizer), (2, 32))
    batch = {"input_ids": ids, "labels": ids.clone()}
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="/tmp/unused", report_to="none", use_cpu=True)
    ce_only = distill.DistillTrainer(model=student, args=args, teacher=teacher, temperature=2.0, alpha_kd=0.0,
                                     alpha_ce=1.0)
    assert torch.allclose(ce_only.compute_loss(student, batch), student(**batch).loss)
    kd_only = distill.DistillTrainer(model=student, args=args, teacher=teacher, temperature=2.0, alpha_kd=1.0,
                                     alpha_ce=0.0)
    assert kd_only.compute_loss(student, batch).item() > 0
    # a student identical to its teacher has zero KD loss
    twin = distill.DistillTrainer(model=teacher, args=args, teacher=teacher, temperature=2.0, alpha_kd=1.0,
                                  alpha_ce=0.0)
    assert twin.compute_loss(teacher, batch).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_distill_stage_kd_loss_decreases(arch, tiny_models, make_recipe):
    path = make_recipe(tiny_models[arch], finetune={"enabled": False}, distill={"every": 2})
    _, out = _run(path, ["load", "distill"])
    rec = _record(out["distill"])
    assert rec["layer_map"] == [0, 2]
    assert rec["metrics"]["train_loss_last"] < rec["metrics"]["train_loss_first"]
    assert rec["metrics"]["params_ratio"] < 1
    card = (out["distill"] / "README.md").read_text()
    assert "distillation" in card and "layers [0, 2]" in card


@pytest.mark.parametrize("context,stride", [(64, 32), (64, 64), (48, 16)])
def test_perplexity_matches_the_guide(context, stride, tiny_models, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    ids = tokenizer(data.stdlib_corpus_file().read_text()[:4000])["input_ids"][:500]
    ours = perplexity(model, ids, context, stride)
    ref, n = guide_perplexity(model, ids, context, stride)
    assert ours["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert ours["scored_tokens"] == n
    if stride < context:  # overlapping windows score every token but the first exactly once
        assert n == len(ids) - 1
    assert math.isfinite(ours["perplexity"]) and 1 < ours["perplexity"] < len(tokenizer) * 2


def test_save_model_round_trip_gives_identical_logits(tiny_models, tmp_path):
    for arch, folder in tiny_models.items():
        model, tok = models.load_folder(folder)
        checkpoint.save_model(tmp_path / arch, model, tok)
        again, _ = models.load_folder(tmp_path / arch)
        ids = torch.arange(1, 33).unsqueeze(0)
        assert torch.equal(_logits(model, ids), _logits(again, ids))
        assert (tmp_path / arch / "model.safetensors").is_file()
