"""Fine-tune stage: LoRA / QLoRA on tiny real models, chat data with masked prompts, training controls, resume."""
import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import chat, data, dist, formats, lora, models, recipe, runner
from pipeline.errors import StageError
from pipeline.cli import main
from tiny import logits as _logits, record as _record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = {"progress_bar": False, "report_to": "none"}
ONLY_FINETUNE = {"distill": {"enabled": False}, "quantize": {"enabled": False}, "evaluate": {"enabled": False}}
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
            "{% else %}A: {{ m['content'] }}<|endoftext|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}A:{% endif %}")


def _same_shapes(a, b) -> bool:
    return {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def _finetune(path, *overrides):
    r = recipe.load(path, list(overrides))
    return runner.run(r, ["load", "finetune"])


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_methods_lower_loss_and_merge_into_plain_weights(arch, method, tiny_models, make_recipe, tmp_path):
    from peft import PeftModel

    # A frozen random model has little for an adapter to steer on varied prose; a repeated sentence it can
    # learn within 12 steps, through the adapted projections alone.
    text = tmp_path / "repeated.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 400)
    path = make_recipe(tiny_models[arch], data={"source": str(text)},
                       finetune={"method": method, "learning_rate": 1.0e-2, **QUIET})
    out = _finetune(path)
    folder, rec = out["finetune"], _record(out["finetune"])
    m = rec["metrics"]
    assert m["train_loss_last"] < m["train_loss_first"] - 0.4, m
    assert 0 < m["trainable_params"] < 0.25 * m["params"]
    expected = lora.DEFAULT_TARGETS[arch]
    assert rec["lora_targets"] == sorted(expected)
    # the stage output is a plain full-weight model: no adapter files beside the weights, loads without PEFT
    assert not (folder / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not hasattr(merged, "peft_config")
    assert _same_shapes(merged, AutoModelForCausalLM.from_pretrained(out["load"]))
    # ... and it is exactly base + adapter, the adapter being a standard PEFT folder
    adapter_cfg = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 8
    assert set(adapter_cfg["target_modules"]) == set(expected)
    base = AutoModelForCausalLM.from_pretrained(out["load"]).eval()
    ids = torch.arange(1, 49).unsqueeze(0)
    base_logits = _logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, folder / "adapter").eval()
    assert torch.allclose(_logits(merged, ids), _logits(with_adapter, ids), atol=1e-4)
    assert (_logits(merged, ids) - base_logits).abs().max() > 1e-2, "the adapter changed nothing"
    # merged into the full-precision base, not a 4-bit copy: the weight change is the rank-8 LoRA update,
    # with no 4-bit rounding noise (which would make it full rank)
    name = "transformer.h.0.attn.c_attn.weight" if arch == "gpt2" else "model.layers.0.self_attn.q_proj.weight"
    delta = merged.state_dict()[name] - AutoModelForCausalLM.from_pretrained(out["load"]).state_dict()[name]
    assert delta.abs().max() > 1e-4 and torch.linalg.matrix_rank(delta, atol=1e-5) <= 8


@pytest.mark.parametrize("arch,wrong,right", [("gpt2", "q_proj", "c_attn"), ("llama", "c_attn", "q_proj")])
def test_lora_targets_that_match_nothing_exit_2_at_validate(arch, wrong, right, tiny_models, make_recipe, capsys):
    """validate builds the model from its config on the meta device and says it before any stage runs (the load
    stage's folder is never made); the layers a model has pass."""
    path = make_recipe(tiny_models[arch], finetune={"method": "lora", "lora": {"target_modules": [right, wrong]},
                                                    **QUIET})
    for command in (["validate", str(path)], ["run", str(path), "--until", "finetune"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"finetune.lora.target_modules: ['{wrong}'] match no layer of this {arch} model" in err, err
        assert right in err.split("adaptable layers are:")[1]
    assert not (path.parent / "runs" / "tiny" / "base").exists()
    fixed = make_recipe(tiny_models[arch], name="fixed", finetune={"method": "lora", "lora": {"target_modules": [right]}})
    assert main(["validate", str(fixed)]) == 0, capsys.readouterr().err


def test_qlora_without_bitsandbytes_is_a_recipe_error(tiny_models, make_recipe, monkeypatch, capsys):
    monkeypatch.setattr(lora, "bitsandbytes_missing", lambda: True)
    assert main(["validate", str(make_recipe(tiny_models["gpt2"], finetune={"method": "qlora"}))]) == 2
    assert "finetune.method: qlora needs bitsandbytes" in capsys.readouterr().err


# ---------- chat data ----------

CONVERSATION = [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A mutable sequence."},
                {"role": "user", "content": "And a tuple?"}, {"role": "assistant", "content": "An immutable one."}]


def _templated(tokenizer):
    tok = copy.deepcopy(tokenizer)  # the session tokenizer stays template-free for other tests
    tok.chat_template = TEMPLATE
    return tok


def test_chat_labels_cover_exactly_the_responses(tokenizer):
    tok = _templated(tokenizer)
    enc = chat.encode(CONVERSATION, tok)
    assert len(enc["labels"]) == len(enc["input_ids"])
    kept = [t for t in enc["labels"] if t != chat.IGNORE]
    assert tok.decode(kept) == " A mutable sequence.<|endoftext|>\n An immutable one.<|endoftext|>\n"
    prompt_side = [i for i, label in zip(enc["input_ids"], enc["labels"]) if label == chat.IGNORE]
    assert tok.decode(prompt_side) == "Q: What is a list?\nA:Q: And a tuple?\nA:"
    # labelled positions carry the token itself (the model shifts labels internally)
    assert all(label in (chat.IGNORE, i) for i, label in zip(enc["input_ids"], enc["labels"]))


def test_masked_tokens_carry_no_loss(tiny_models, tokenizer):
    tokenizer = _templated(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    features = [chat.encode(CONVERSATION, tokenizer), chat.encode(CONVERSATION[:2], tokenizer)]
    batch = chat.collator(tokenizer)(features)
    assert (batch["labels"][1, len(features[1]["labels"]):] == chat.IGNORE).all()  # padding is masked too
    with torch.no_grad():
        loss = model(**batch).loss
        # any change to the prompt's labels or the padding's ids changes nothing: those positions are not scored
        other = {**batch, "labels": batch["labels"].clone(), "input_ids": batch["input_ids"].clone()}
        masked = batch["labels"] == chat.IGNORE
        other["input_ids"][1, len(features[1]["input_ids"]):] = 7
        assert torch.equal(model(**other).loss, loss)
        logp = torch.log_softmax(model(**batch).logits[:, :-1].float(), -1)
        targets = batch["labels"][:, 1:]
        scored = targets != chat.IGNORE
        manual = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0][scored].mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert masked.any() and (~masked).any()


def _qa_file(tmp_path, n=64):
    """Prompts are varied prose; the response is always the same sentence."""
    docs = [json.loads(line)["text"] for line in data.stdlib_corpus_file().read_text().splitlines()[:n]]
    lines = [json.dumps({"question": " ".join(doc.split()[:12]), "answer": "The answer is forty-two."}) for doc in docs]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _region_losses(model, tok, rows):
    """Mean token loss on the prompt side and on the response side of chat rows."""
    sums = {"prompt": [0.0, 0], "response": [0.0, 0]}
    for row in rows:
        enc = chat.encode(row, tok)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
        for pos, value in enumerate(nll.tolist()):
            side = "prompt" if enc["labels"][pos + 1] == chat.IGNORE else "response"
            sums[side][0] += value
            sums[side][1] += 1
    return {k: s / n for k, (s, n) in sums.items()}


def test_chat_finetune_learns_responses_not_prompts(tiny_models, make_recipe, tmp_path):
    path = make_recipe(
        tiny_models["gpt2"],
        data={"source": str(_qa_file(tmp_path)), "format": "chat", "prompt_column": "question",
              "response_column": "answer", "chat_template": TEMPLATE, "block_size": 64},
        finetune={"max_steps": 16, "batch_size": 8, "learning_rate": 3.0e-3, "logging_steps": 1,
                  "gradient_checkpointing": True, "progress_bar": False, "report_to": "tensorboard"},
    )
    out = _finetune(path)
    rec = _record(out["finetune"])
    tuned, base = (AutoModelForCausalLM.from_pretrained(out[k]).eval() for k in ("finetune", "load"))
    tok = chat_tokenizer(out["finetune"])
    assert tok.chat_template == TEMPLATE  # saved with the model, so inference uses the same format
    rows = [[{"role": "user", "content": f"Tell me about topic number {i}"},
             {"role": "assistant", "content": "The answer is forty-two."}] for i in range(4)]
    before, after = _region_losses(base, tok, rows), _region_losses(tuned, tok, rows)
    assert after["response"] < before["response"] - 2.0, (before, after)  # the fixed answer is learnt ...
    assert after["prompt"] > before["prompt"] - 0.5, (before, after)  # ... the unscored prompts are not
    # padded batches: tokens are counted, not batch shape x steps
    assert 0 < rec["metrics"]["train_tokens"] < 16 * 8 * 64
    events = list((out["finetune"].parent / ".trainer" / "finetune" / "runs").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard logging was requested"


def chat_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_chat_data_without_the_named_fields_exit_2(tiny_models, make_recipe, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(20)))
    path = make_recipe(tiny_models["gpt2"], data={"source": str(bad), "format": "chat", "chat_template": TEMPLATE})
    assert main(["run", str(path), "--until", "finetune"]) == 2
    err = capsys.readouterr().err
    assert "needs a 'messages' column" in err and "instruction, output" in err and "data.prompt_column" in err


def test_chat_without_a_template_exit_2_at_validate(tiny_models, make_recipe, tmp_path, capsys):
    """Said by validate from the tokenizer's files, before the load stage runs; a template in the recipe, or one
    the tokenizer saved (chat_template.jinja), passes. The stage's own check stays for what validate cannot read
    (a Hub tokenizer)."""
    qa = {"source": str(_qa_file(tmp_path, 20)), "format": "chat", "prompt_column": "question",
          "response_column": "answer"}
    path = make_recipe(tiny_models["gpt2"], data=qa)
    for command in ("validate", "run"):
        assert main([command, str(path), *(["--until", "finetune"] if command == "run" else [])]) == 2
        assert f"data.chat_template: the tokenizer of '{tiny_models['gpt2']}' has no chat template" in \
            capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny" / "base").exists()
    assert main(["validate", str(make_recipe(tiny_models["gpt2"], name="own", data={**qa, "chat_template": TEMPLATE}))]) == 0
    model, tok = formats.load_folder(tiny_models["gpt2"])
    tok.chat_template = TEMPLATE
    model.save_pretrained(tmp_path / "templated")
    tok.save_pretrained(tmp_path / "templated")
    assert main(["validate", str(make_recipe(tmp_path / "templated", name="saved", data=qa))]) == 0
    with pytest.raises(StageError, match="the tokenizer of this model has no chat template"):
        chat.tokenize(data.load_splits(data.DataConfig(**qa), 0), models.load_tokenizer(
            models.Source("folder", str(tiny_models["gpt2"]))), data.DataConfig(**qa))


# ---------- training controls ----------

def test_early_stopping_keeps_the_best_model(tiny_models, make_recipe, tmp_path):
    """Four training blocks at a high learning rate overfit fast: validation loss turns up, training stops
    early, and the saved model is the one with the lowest validation loss."""
    path = make_recipe(tiny_models["llama"], data={"block_size": 64, "max_train_blocks": 4, "validation_percent": 3},
                       finetune={"max_steps": 80, "batch_size": 4, "learning_rate": 1.0e-2, "eval_steps": 2,
                                 "early_stopping_patience": 2, "save_steps": 2, **QUIET})
    out = _finetune(path)
    m = _record(out["finetune"])["metrics"]
    assert m["train_steps"] < 80, "early stopping never triggered"
    assert m["best_step"] < m["train_steps"] and m["eval_loss_best"] < m["eval_loss_last"]
    # the folder holds the best evaluation's weights: measured the Trainer's way, its validation loss is
    # eval_loss_best (transformers 5 divides by the unshifted label count, so a hand-rolled mean differs)
    from transformers import Trainer, TrainingArguments, default_data_collator

    r = recipe.load(path)
    tuned = AutoModelForCausalLM.from_pretrained(out["finetune"]).eval()
    val = data.pack(data.prepare(r.data, chat_tokenizer(out["finetune"]), r.seed), 64)["validation"]
    args = TrainingArguments(output_dir=str(tmp_path / "eval"), per_device_eval_batch_size=4, report_to="none",
                             use_cpu=True)
    again = Trainer(model=tuned, args=args, eval_dataset=val, data_collator=default_data_collator).evaluate()
    assert again["eval_loss"] == pytest.approx(m["eval_loss_best"], abs=1e-4)
    assert not list((out["finetune"].parent / ".trainer" / "finetune").glob("checkpoint-*")), "checkpoints left"


def test_training_knobs_are_checked(tiny_models, make_recipe, capsys):
    path = make_recipe(tiny_models["gpt2"], finetune={"keep_best": True, "eval_steps": 4, "save_steps": 6,
                                                      "resume_from": "/nowhere"})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    for needle in ("finetune.save_steps: 6 must be a multiple of eval_steps (4)", "finetune.resume_from: '/nowhere'"):
        assert needle in err, needle
    for section, needle in [({"early_stopping_patience": 3}, "need eval_steps"),
                            ({"lora": {"r": 0, "alpha": 16}}, "finetune.lora.r: 0 must be at least 1"),
                            ({"method": "dora"}, "finetune.method: 'dora' is not allowed; use one of: full, lora, qlora")]:
        assert main(["validate", str(make_recipe(tiny_models["gpt2"], finetune=section))]) == 2
        assert needle in capsys.readouterr().err, needle


# ---------- resume ----------

def _markers(run_dir):
    return sorted((run_dir / ".trainer" / "finetune").glob("checkpoint-*/pipeline-checkpoint.json"))


@pytest.mark.slow  # two pipeline processes and three training runs: ~30 s on 2 busy cores
def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tiny_models, make_recipe, tmp_path, capsys):
    settings = dict(finetune={"max_steps": 40, "save_steps": 5, "save_total_limit": 2, **QUIET}, **ONLY_FINETUNE)
    killed = make_recipe(tiny_models["gpt2"], name="killed", **settings)
    run_dir = tmp_path / "runs" / "killed"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(killed)], cwd=ROOT, stdout=log, stderr=log)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not any(
            json.loads(p.read_text())["step"] >= 10 for p in _markers(run_dir)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # as an OOM killer or a preempted node would
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "finetune").exists() and _markers(run_dir)

    # a changed setting does not silently continue someone else's optimizer state
    assert main(["run", str(killed), "finetune.learning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "belongs to a different run" in err and "--force" in err

    assert main(["run", str(killed)]) == 0
    resumed = _record(run_dir / "finetune")["metrics"]
    assert resumed["resumed_from"].startswith("checkpoint-") and int(resumed["resumed_from"][11:]) >= 10
    assert resumed["train_steps"] == 40
    assert not list((run_dir / ".trainer" / "finetune").glob("checkpoint-*")), "checkpoints are cleared when done"

    reference = make_recipe(tiny_models["gpt2"], name="reference", **settings)
    assert main(["run", str(reference)]) == 0
    straight = _record(tmp_path / "runs" / "reference" / "finetune")["metrics"]
    assert "resumed_from" not in straight
    assert resumed["train_loss_last"] == pytest.approx(straight["train_loss_last"], abs=1e-5)
    assert resumed["train_loss_first"] == pytest.approx(straight["train_loss_first"], abs=1e-6)
    assert resumed["train_loss_mean"] == pytest.approx(straight["train_loss_mean"], abs=1e-4)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / n / "finetune") for n in ("killed", "reference"))
    ids = torch.arange(1, 33).unsqueeze(0)
    assert torch.allclose(_logits(a, ids), _logits(b, ids), atol=1e-4)


def test_force_starts_afresh_and_foreign_checkpoints_are_refused(tiny_models, make_recipe, tmp_path, capsys):
    path = make_recipe(tiny_models["llama"], finetune={"max_steps": 4, "save_steps": 2, **QUIET}, **ONLY_FINETUNE)
    stale = tmp_path / "runs" / "tiny" / ".trainer" / "finetune" / "checkpoint-2"
    stale.mkdir(parents=True)
    (stale / "pipeline-checkpoint.json").write_text(json.dumps({"fingerprint": "0123", "recipe": "other", "step": 2}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "recipe 'other'" in err and str(stale) in err
    assert main(["run", str(path), "--force"]) == 0
    assert "resumed_from" not in _record(tmp_path / "runs" / "tiny" / "finetune")["metrics"]
    assert not stale.exists()
    # resume_from naming a checkpoint that this pipeline did not write
    (stale / "trainer_state.json").parent.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    assert main(["run", str(path), f"finetune.resume_from={stale}", "finetune.max_steps=5"]) == 2
    assert "not a finished llm-pipeline checkpoint" in capsys.readouterr().err


# ---------- multi-process ----------

def _launch(recipe_path, *launch_args):
    """`accelerate launch <launch_args> -m pipeline run RECIPE` with 2 CPU processes; the finished process."""
    with socket.socket() as s:  # a free port, so concurrent test runs do not collide on 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", *launch_args, "--num_processes", "2", "--num_machines", "1", "--main_process_port",
           str(port), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline", "run", str(recipe_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow  # three Python processes importing torch + transformers: ~30 s on 2 busy cores
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_run_writes_once(tiny_models, make_recipe, tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP over gloo): both train, rank 0 alone writes."""
    path = make_recipe(tiny_models["llama"], finetune={"max_steps": 6, "batch_size": 4, **QUIET},
                       distill={"enabled": False}, quantize={"enabled": False},
                       evaluate={"models": ["base", "finetune"]})
    done = _launch(path, "--multi_gpu")
    run_dir = tmp_path / "runs" / "tiny"
    m = _record(run_dir / "finetune")["metrics"]
    assert m["world_size"] == 2 and m["parallelism"] == "ddp"
    assert m["train_tokens"] == 6 * 4 * 64 * 2  # each step saw a batch on each process
    assert m["train_loss_last"] < m["train_loss_first"] - 0.1
    assert done.stderr.count("finetune: reading") == 1  # only rank 0 logs
    # tasks/: evaluate's offline task; general/: the base model's general-English text; measurements.json: the
    # measure-once store. Each written once, by rank 0 (a second writer would leave a .partial or a torn file).
    assert sorted(p.name for p in run_dir.iterdir()) == [".trainer", "base", "finetune", "general",
                                                         "measurements.json", "report.json", "report.md",
                                                         "report.png", "tasks"]
    json.loads((run_dir / "measurements.json").read_text())
    assert not list(tmp_path.rglob(".*.partial"))
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["name"] for r in report["models"]] == ["base", "finetune"]
    assert math.isfinite(report["models"][1]["perplexity"])
    assert dist.world_size() == 1  # the test process itself is not part of the group


FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
"""


@pytest.mark.slow  # three Python processes importing torch + transformers: ~30 s on 2 busy cores
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_lora_under_an_fsdp_config_on_cpu_trains_merges_and_says_it_used_ddp(tiny_models, make_recipe, tmp_path):
    """The FSDP config file a GPU user would pass: on CPU accelerate falls back to DDP, and the stage says so;
    the adapter is saved and merged by the same path FSDP uses (gathered state dict, base reloaded)."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    path = make_recipe(tiny_models["gpt2"], finetune={"method": "lora", "max_steps": 6, "batch_size": 4, **QUIET},
                       **ONLY_FINETUNE)
    done = _launch(path, "--config_file", str(config))
    out = tmp_path / "runs" / "tiny" / "finetune"
    m = _record(out)["metrics"]
    assert m["world_size"] == 2 and m["parallelism"] == "ddp"
    assert m["train_loss_last"] < m["train_loss_first"]
    assert "asks for FSDP" in done.stderr and done.stderr.count("asks for FSDP") == 1
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(out)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]), out / "adapter")
    ids = torch.arange(1, 33).unsqueeze(0)
    assert torch.allclose(_logits(merged, ids), _logits(adapted, ids), atol=1e-4)
    assert not torch.allclose(_logits(merged, ids), _logits(AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]), ids), atol=1e-4)


def test_lora_on_fused_experts_trains_without_dropout_and_refuses_one(tokenizer, make_recipe, tmp_path, capsys):
    """transformers 5 fuses each mixture-of-experts layer's experts into 3-D weights, which peft's all-linear
    adapts as parameters and only without dropout: by default the adapter takes none there (and trains the
    experts), an explicit dropout is refused at validate with the fix."""
    from peft import PeftModel
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=len(tokenizer),
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    folder = tmp_path / "tiny-moe"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert lora.fused_experts(model)
    refused = make_recipe(folder, name="refused", finetune={"method": "lora", "lora": {"dropout": 0.05}})
    assert main(["validate", str(refused)]) == 2
    err = capsys.readouterr().err
    assert "finetune.lora.dropout: 0.05" in err and "set finetune.lora.dropout: 0" in err, err
    path = make_recipe(folder, finetune={"method": "lora", "max_steps": 6, "learning_rate": 1e-2, **QUIET})
    out = _finetune(path)
    adapter = json.loads((out["finetune"] / "adapter" / "adapter_config.json").read_text())
    assert adapter["lora_dropout"] == 0.0
    merged = AutoModelForCausalLM.from_pretrained(out["finetune"]).eval()
    base = AutoModelForCausalLM.from_pretrained(out["load"]).eval()
    name = next(n for n, p in base.named_parameters() if p.dim() == 3)
    assert (merged.state_dict()[name] - base.state_dict()[name]).abs().max() > 1e-5, f"{name} was not trained"
    ids = torch.arange(1, 33).unsqueeze(0)
    with_adapter = PeftModel.from_pretrained(base, out["finetune"] / "adapter").eval()
    assert torch.allclose(_logits(merged, ids), _logits(with_adapter, ids), atol=1e-4)
