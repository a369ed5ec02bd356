"""Each stage on tiny real models: real training, real quantization, real numbers."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import checkpoint, data, models, recipe, runner
from pipeline.metrics import guide_perplexity, perplexity

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
def test_quantize_int8_is_smaller_and_reloads_identically(arch, tiny_models, make_recipe, tmp_path):
    import bitsandbytes as bnb

    path = make_recipe(tiny_models[arch], finetune={"enabled": False}, distill={"enabled": False})
    r, out = _run(path, ["load", "quantize"])
    q_dir = out["quantize"]
    assert models.disk_size(q_dir) < 0.6 * models.disk_size(out["load"])
    q_cfg = json.loads((q_dir / "config.json").read_text())["quantization_config"]
    assert q_cfg["load_in_8bit"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(q_dir, device_map="cpu")
    int8 = [m for m in reloaded.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    # every projection in every block is 8-bit (GPT-2's Conv1D included): 4 per GPT-2 block, 7 per Llama block
    assert len(int8) == 4 * (4 if arch == "gpt2" else 7)
    assert all(m.weight.dtype == torch.int8 for m in int8)
    fresh = models.load_model(models.Source("folder", str(out["load"])),
                              quantization_config=__import__("transformers").BitsAndBytesConfig(load_in_8bit=True),
                              device_map="cpu")
    ids = torch.arange(1, 33).unsqueeze(0)
    assert torch.equal(_logits(fresh, ids), _logits(reloaded, ids))
    fp32 = AutoModelForCausalLM.from_pretrained(out["load"])
    assert torch.allclose(_logits(fp32, ids), _logits(reloaded, ids), atol=0.1)


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
