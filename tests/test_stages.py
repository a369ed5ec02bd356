"""Each stage on tiny real models: real training, real quantization, real numbers."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import data, folders, formats
from pipeline.metrics import guide_perplexity, perplexity
from tiny import run_stages as _run, logits as _logits, record as _record

ARCHS = ["gpt2", "llama"]


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
        model, tok = formats.load_folder(folder)
        folders.save_model(tmp_path / arch, model, tok)
        again, _ = formats.load_folder(tmp_path / arch)
        ids = torch.arange(1, 33).unsqueeze(0)
        assert torch.equal(_logits(model, ids), _logits(again, ids))
        assert (tmp_path / arch / "model.safetensors").is_file()
