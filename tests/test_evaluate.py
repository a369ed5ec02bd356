"""Evaluation: batched perplexity equals the reference loop, scored-token counts, report files, generation."""
import copy
import json
import os
import math
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import general, data, report
from pipeline.cli import main
from pipeline.generate import GenerationConfig, generate
from pipeline.metrics import guide_perplexity, perplexity, windows


@pytest.fixture(scope="module")
def llama_and_ids(tiny_models, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    ids = tokenizer(data.stdlib_corpus_file().read_text()[:6000])["input_ids"][:700]
    return model, ids


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_perplexity_equals_unbatched_reference(batch_size, llama_and_ids):
    model, ids = llama_and_ids
    ref, n = guide_perplexity(model, ids, 64, 16)
    ours = perplexity(model, ids, 64, 16, batch_size=batch_size)
    assert ours["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert ours["scored_tokens"] == n


@pytest.fixture(scope="module")
def tiny_pair(tiny_models, tokenizer):
    ids = tokenizer(data.stdlib_corpus_file().read_text()[:6000])["input_ids"][:700]
    return {arch: AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval() for arch in ("gpt2", "llama")}, ids


# (tokens, context, stride, batch size): 700 - 64 = 636 is not a multiple of 16, 40 or 48, so the last window
# scores fewer tokens than the stride; stride == context; 50 and 200 tokens fit in one window (text shorter
# than one context); 256 is the tiny models' longest position
WINDOWS = [(700, 64, 16, 1), (700, 64, 40, 3), (700, 96, 48, 16), (700, 50, 50, 4), (700, 256, 128, 2),
           (50, 64, 16, 8), (200, 256, 128, 8)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("tokens,context,stride,batch_size", WINDOWS)
def test_perplexity_equals_the_guide_loop(arch, tokens, context, stride, batch_size, tiny_pair):
    models, ids = tiny_pair
    ids = ids[:tokens]
    assert len(ids) == tokens
    ref, n = guide_perplexity(models[arch], ids, context, stride)
    ours = perplexity(models[arch], ids, context, stride, batch_size=batch_size)
    assert ours["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert ours["scored_tokens"] == n == sum(k for *_, k in windows(tokens, context, stride))


def test_the_lm_head_runs_only_on_the_scored_positions(tiny_models, tokenizer):
    ids = tokenizer(data.stdlib_corpus_file().read_text()[:6000])["input_ids"][:700]
    for arch in ("gpt2", "llama"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
        seen = []
        hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
        ours = perplexity(model, ids, 64, 16, batch_size=8)
        hook.remove()
        ref, _ = guide_perplexity(model, ids, 64, 16)
        assert ours["perplexity"] == pytest.approx(ref, rel=1e-4), arch
        # the first window scores 63 tokens; every later one its 16 new tokens (+1 position that is dropped),
        # the last one what is left
        assert seen[0][1] == 64 and {s[1] for s in seen[1:-1]} == {17} and seen[-1][1] <= 17, (arch, seen)


def test_context_and_stride_set_the_scored_token_count():
    # overlapping windows: every token but the first is scored exactly once
    assert sum(k for *_, k in windows(1000, 128, 64)) == 999
    assert sum(k for *_, k in windows(1000, 128, 1)) == 999
    # disjoint windows (stride == context): the first token of each window has no context and is not scored
    w = windows(1000, 100, 100)
    assert len(w) == 10 and sum(k for *_, k in w) == 1000 - 10
    # a larger stride means fewer, wider-spaced windows
    assert len(windows(1000, 128, 32)) > len(windows(1000, 128, 96))


def test_word_level_perplexity_is_reported(tiny_models, make_recipe, tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text(data.stdlib_corpus_file().read_text()[:3000])
    path = make_recipe(tiny_models["gpt2"], finetune={"enabled": False}, distill={"enabled": False},
                       quantize={"enabled": False},
                       evaluate={"word_level": True, "texts": [str(extra)], "speed": False, "samples": False})
    assert main(["run", str(path)]) == 0
    row = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())["models"][0]
    val, gen, ext = row["evaluations"]  # the validation split, the run's general English, the extra file
    assert gen["dataset"] == general.LABEL and gen["word_perplexity"] > gen["perplexity"]
    assert ext["dataset"] == "extra.txt" and ext["scored_tokens"] > 100
    # BPE tokens are shorter than words, so the same NLL spread over fewer words gives a higher perplexity
    assert val["word_perplexity"] > val["perplexity"] > 1
    assert "ppl extra.txt" in (tmp_path / "runs" / "tiny" / "report.md").read_text()


def test_report_has_every_model_and_metric_and_a_png(tiny_models, make_recipe, tmp_path):
    path = make_recipe(tiny_models["llama"], evaluate={"repeats": 1, "new_tokens": 4, "prompts": ["The list"],
                                                       "memory": True})
    assert main(["run", str(path)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    report = json.loads((run_dir / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["base", "finetune", "distill", "quantize"]
    for m in report["models"]:
        for key in ("perplexity", "params", "disk_mb", "peak_mem_mb", "prefill_tok_s", "gen_tok_s", "samples",
                    "ppl_vs_base_pct", "size_vs_base_pct"):
            assert m[key] is not None, (m["name"], key)
        assert math.isfinite(m["perplexity"]) and m["gen_tok_s"] > 0 and m["peak_mem_mb"] >= 0
        assert m["speed_settings"]["prefill_tokens"] == 32
        assert m["samples"][0]["prompt"] == "The list" and m["samples"][0]["output"]
        # the offline lm-eval task on every model, the bitsandbytes int8 one included
        assert 0 <= m["tasks"]["heldout_continuation"]["acc"] <= 1, m["name"]
    png = (run_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1600, 500)  # one panel per text: the validation split and general English
    md = (run_dir / "report.md").read_text()
    assert "report.png" in md and "## Samples (greedy" in md and "**quantize**" in md
    assert "Peak memory: measured for each model in a fresh process" in md
    assert "heldout_continuation acc |" in md


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_generate_each_decoding_mode(strategy, tiny_models, tokenizer, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).eval()
    cfg = GenerationConfig(strategy=strategy, max_new_tokens=8, num_beams=3, seed=1)
    out = generate(model, tokenizer, "The Python", cfg)
    assert out and out == generate(model, tokenizer, "The Python", cfg)  # deterministic (sampling is seeded)
    enc = tokenizer("The Python", return_tensors="pt")
    if strategy == "greedy":
        ref = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert out == tokenizer.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert main(["generate", str(tiny_models["gpt2"]), "The Python", "--strategy", strategy,
                 "--max-new-tokens", "8", "--num-beams", "3", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == ("The Python" + out).strip()
    if strategy == "sample":
        other = generate(model, tokenizer, "The Python", GenerationConfig(strategy="sample", max_new_tokens=8, seed=2))
        greedy = generate(model, tokenizer, "The Python", GenerationConfig(max_new_tokens=8))
        assert len({out, other, greedy}) > 1


def test_generate_bad_arguments_exit_2(tiny_models, capsys):
    assert main(["generate", str(tiny_models["gpt2"]), "x", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "/no/such/folder", "x"]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_peak_memory_sees_a_large_allocation():
    from pipeline.metrics import PeakMemory

    with PeakMemory(torch.device("cpu")) as mem:
        block = torch.ones(64, 2**20)  # 256 MB
        del block
    assert 200 < mem.peak_mb < 400  # the baseline the process already held is not counted


def test_peak_memory_is_measured_in_a_process_of_its_own(tokenizer, tmp_path):
    """Each folder in a fresh process: the rise follows the model's weights (measured in the evaluating process it
    once showed 16 MB for a 513 MB model, the memory an earlier model freed being reused); a folder that fails to
    load gives the reason, not a number."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import formats, memprobe

    def save(name: str, intermediate: int):
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=256, intermediate_size=intermediate, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=256,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        return tmp_path / name

    small, large = save("small", 64), save("large", 8192)  # about 100 MB more weights in the MLPs
    args = ("cpu", ["The list"], 32, 4)
    small_mb = memprobe.measure(small, *args)["peak_mem_mb"]
    large_mb = memprobe.measure(large, *args)["peak_mem_mb"]
    more = formats.disk_mb(large) - formats.disk_mb(small)
    assert more > 90 and 0.8 * more < large_mb - small_mb < 2 * more, (small_mb, large_mb, more)
    (small / "model.safetensors").write_bytes(b"not a safetensors file")
    broken = memprobe.measure(small, *args)
    assert "peak_mem_mb" not in broken and broken["peak_mem_error"], broken


def test_speed_runs_without_autograd(tiny_models, tokenizer):
    """The timed passes build no autograd graph (a graph would slow them and hold every activation)."""
    from pipeline.metrics import speed

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    seen = []
    model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    speed(model, tokenizer, ["The list"], 8, 2, 1)
    assert seen and not any(seen)


def test_generate_from_an_empty_prompt_starts_at_bos(tiny_models, tokenizer, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    cfg = GenerationConfig(max_new_tokens=6)
    bos = torch.tensor([[tokenizer.bos_token_id]])
    ref = model.generate(input_ids=bos, attention_mask=torch.ones_like(bos), max_new_tokens=6, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    assert generate(model, tokenizer, "", cfg) == tokenizer.decode(ref[0, 1:], skip_special_tokens=True)
    assert main(["generate", str(tiny_models["llama"]), "", "--max-new-tokens", "6"]) == 0
    no_bos = copy.deepcopy(tokenizer)  # the fixture is shared
    no_bos.bos_token = None  # nothing to start from: a clear error, not a reshape failure inside the model
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, no_bos, "", cfg)


def test_a_speed_taken_on_a_busy_machine_or_from_unstable_runs_is_flagged(monkeypatch):
    import itertools
    import time as _time

    from pipeline import metrics, report

    monkeypatch.setattr(metrics, "machine_load", lambda: 0.2)
    _, calm = metrics._median_seconds(lambda: _time.sleep(0.05), 3)
    assert calm["runs"] == 3 and not calm["noisy"] and calm["spread"] < metrics.NOISY_SPREAD
    waits = itertools.cycle([0.02, 0.08])  # runs that never agree: repeated, then flagged
    _, shaky = metrics._median_seconds(lambda: _time.sleep(next(waits)), 3)
    assert shaky["runs"] == metrics.MORE_RUNS * 3 and shaky["noisy"] and shaky["spread"] > metrics.NOISY_SPREAD
    cores = os.cpu_count()
    monkeypatch.setattr(metrics, "machine_load", lambda: 2.0 * cores)  # other work on every core
    _, busy = metrics._median_seconds(lambda: _time.sleep(0.05), 3)
    assert busy["noisy"] and busy["load"] == 2.0 * cores
    row = {"name": "base", "disk_mb": 1.0, "perplexity": 10.0, "gen_tok_s": 8.3, "prefill_tok_s": 100.0,
           "speed_noisy": True, "speed_noise": {"generate": busy, "prefill": calm}}
    md = report.markdown("r", [row, {**row, "name": "finetune", "speed_noisy": False}])
    assert "| 8.3 (noisy) |" in md and "| 8.3 |" in md and f"load {2.0 * cores} on {cores} cores" in md


def test_points_that_sit_together_on_the_report_plot_share_one_label():
    """The quick start's base and fine-tuned model score about the same on general English at one size: their labels
    were drawn over each other. Close points (in the axis' own terms) now get one stacked label; others their own."""
    shown = [{"disk_mb": mb, "quality": {"general": ppl}}
             for mb, ppl in [(513.2, 26.83), (513.2, 27.33), (405.6, 114.3), (405.6, 95.6), (97.0, 29.5)]]
    assert report._close(shown[0], shown[1], shown, "general")
    assert not report._close(shown[2], shown[3], shown, "general")  # one size, far apart in perplexity
    assert not report._close(shown[0], shown[4], shown, "general")  # one perplexity, far apart in size
