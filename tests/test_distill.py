"""Distillation on tiny real models: both student constructions, the loss terms, errors, the card."""
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, TrainingArguments

from pipeline import formats, models
from pipeline.cli import main
from pipeline.errors import StageError
from pipeline.stages import distill
from tiny import bench_module, run_stages as _run, logits as _logits, record as _record

ARCHS = ["gpt2", "llama"]
ROOT = Path(__file__).resolve().parents[1]


def _trainer(student, teacher, **loss):
    args = TrainingArguments(output_dir="/tmp/unused", report_to="none", use_cpu=True)
    weights = {"temperature": 2.0, "alpha_kd": 0.0, "alpha_ce": 0.0, **loss}
    return distill.DistillTrainer(model=student, args=args, teacher=teacher, **weights)


def _batch(tokenizer, n=32):
    torch.manual_seed(0)
    ids = torch.randint(1, len(tokenizer), (2, n))
    return {"input_ids": ids, "labels": ids.clone()}


# --- layer-subset students -------------------------------------------------------------------

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


def test_student_of_a_frozen_teacher_is_trainable(tiny_models):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval().requires_grad_(False)
    student = distill.student_from_teacher(teacher, [0, 2])
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_layer_maps():
    cfg = distill.DistillConfig
    assert distill.layer_map(cfg(), 12) == [0, 2, 4, 6, 8, 10]
    assert distill.layer_map(cfg(every=3), 30) == list(range(0, 30, 3))
    assert distill.layer_map(cfg(keep=4), 12) == [0, 4, 7, 11]
    assert distill.layer_map(cfg(keep=1), 12) == [0]
    assert distill.layer_map(cfg(layers=[1, 5]), 12) == [1, 5]
    with pytest.raises(StageError, match="out of range"):
        distill.layer_map(cfg(layers=[12]), 12)
    with pytest.raises(StageError, match="more than the teacher's 12 layers"):
        distill.layer_map(cfg(keep=13), 12)


# --- fresh students from a config ------------------------------------------------------------

def test_fresh_student_overrides_the_teacher_config(tiny_models, tokenizer):
    teacher, tok = formats.load_folder(tiny_models["llama"])
    cfg = distill.DistillConfig(config={"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64})
    student, keep = distill.build_student(cfg, teacher, tok)
    assert keep is None and type(student) is type(teacher)
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.head_dim, c.vocab_size) == (2, 32, 8, teacher.config.vocab_size)
    # q,o: h*h; k,v: h*(2 kv heads * 8); mlp: 3*h*64; two norms per layer; final norm; tied embeddings
    h, v = 32, len(tokenizer)
    per_layer = 2 * h * h + 2 * h * 16 + 3 * h * 64 + 2 * h
    assert models.count_params(student) == 2 * per_layer + h + v * h
    # fresh = randomly initialised, not the teacher's weights
    assert not torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, :32])


def test_fresh_student_of_another_architecture(tiny_models):
    teacher, tok = formats.load_folder(tiny_models["llama"])
    cfg = distill.DistillConfig(config={"model_type": "gpt2", "n_layer": 3, "n_embd": 32, "n_head": 4})
    student, _ = distill.build_student(cfg, teacher, tok)
    assert type(student).__name__ == "GPT2LMHeadModel"
    assert student.config.n_layer == 3 and student.config.vocab_size == teacher.config.vocab_size
    assert student.config.eos_token_id == teacher.config.eos_token_id
    batch = _batch(tok)
    loss = _trainer(student, teacher, alpha_kd=1.0).compute_loss(student, batch)
    assert torch.isfinite(loss) and loss > 0


def test_fresh_student_from_a_config_folder(tiny_models, tmp_path, tokenizer):
    teacher, tok = formats.load_folder(tiny_models["gpt2"])
    # a config-only folder: e.g. a published architecture to copy
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).config.save_pretrained(tmp_path / "cfg")
    student, _ = distill.build_student(distill.DistillConfig(config=str(tmp_path / "cfg")), teacher, tok)
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.num_hidden_layers == 4


def test_config_mistakes_are_named(tiny_models):
    teacher, tok = formats.load_folder(tiny_models["llama"])
    build = lambda spec: distill.build_student(distill.DistillConfig(config=spec), teacher, tok)  # noqa: E731
    with pytest.raises(StageError, match=r"num_hiden_layers \(did you mean num_hidden_layers\?\) not a setting"):
        build({"num_hiden_layers": 2})
    with pytest.raises(StageError, match="unknown architecture 'lama'; did you mean llama"):
        build({"model_type": "lama"})
    with pytest.raises(StageError, match="(?s)invalid LlamaConfig.*multiple of the number of attention heads"):
        build({"hidden_size": 30})
    with pytest.raises(StageError, match="cannot read a model config from"):
        build("/nonexistent/folder")
    problems = distill.DistillConfig(config={"vocab_size": 100}, keep=2).check()
    assert any("vocab_size" in p and "teacher's vocabulary" in p for p in problems)
    assert any("cannot also keep teacher layers" in p for p in problems)


def test_vocabulary_and_tokenizer_mismatch_fail_before_training(tiny_models, tmp_path, make_recipe):
    import tiny

    # a config folder whose vocabulary differs from the teacher's
    other = tiny.build_tokenizer(vocab_size=300)
    tiny.save_tiny(tmp_path / "other-vocab", "llama", other, layers=2)
    teacher, tok = formats.load_folder(tiny_models["llama"])
    with pytest.raises(StageError, match="vocabulary mismatch: the teacher has 512 tokens, the student 300"):
        distill.build_student(distill.DistillConfig(config=str(tmp_path / "other-vocab")), teacher, tok)
    # same size, different tokens: the tokenizer next to the config is compared too
    import tokenizers

    shuffled = tmp_path / "shuffled"
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).config.save_pretrained(shuffled)
    raw = json.loads(tokenizers.Tokenizer.from_file(str(tiny_models["llama"] / "tokenizer.json")).to_str())
    vocab = raw["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (shuffled / "tokenizer.json").write_text(json.dumps(raw))
    (shuffled / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(StageError, match="tokenizer mismatch"):
        distill.build_student(distill.DistillConfig(config=str(shuffled)), teacher, tok)
    # through the CLI: exit code 2, a message naming the problem, and no student folder
    path = make_recipe(tiny_models["llama"], finetune={"enabled": False},
                       distill={"config": str(tmp_path / "other-vocab")})
    assert main(["run", str(path), "--stages", "load"]) == 0
    assert main(["run", str(path), "--stages", "distill"]) == 2
    assert not (tmp_path / "runs" / "tiny" / "distill").exists()
    assert not (tmp_path / "runs" / "tiny" / ".trainer" / "distill").exists()


def test_alpha_cos_needs_equal_hidden_sizes(tiny_models):
    teacher, tok = formats.load_folder(tiny_models["llama"])
    cfg = distill.DistillConfig(config={"hidden_size": 32}, alpha_cos=1.0)
    with pytest.raises(StageError, match=r"alpha_cos.*hidden size \(32\) differs from the teacher's \(64\)"):
        distill.build_student(cfg, teacher, tok)


# --- the loss --------------------------------------------------------------------------------

def test_alpha_kd_zero_is_plain_ce_and_twins_have_zero_kd(tiny_models, tokenizer):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    student = distill.student_from_teacher(teacher, [0, 2])
    batch = _batch(tokenizer)
    ce_only = _trainer(student, teacher, alpha_ce=1.0)
    assert torch.allclose(ce_only.compute_loss(student, batch), student(**batch).loss)
    for kl in ("forward", "reverse"):
        assert _trainer(student, teacher, alpha_kd=1.0, kl=kl).compute_loss(student, batch).item() > 1e-4
        twin = _trainer(teacher, teacher, alpha_kd=1.0, alpha_cos=1.0, kl=kl)
        assert twin.compute_loss(teacher, batch).item() == pytest.approx(0.0, abs=1e-5)


def test_kd_loss_matches_its_definition():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.ones(2, 6, dtype=torch.long)
    labels[1, 3:] = -100  # positions 2..4 of row 1 predict ignored tokens
    T = 3.0
    mask = labels[:, 1:] != -100
    ps, pt = torch.softmax(s[:, :-1][mask] / T, -1), torch.softmax(t[:, :-1][mask] / T, -1)
    forward = (pt * (pt.log() - ps.log())).sum(-1).mean() * T**2
    reverse = (ps * (ps.log() - pt.log())).sum(-1).mean() * T**2
    assert distill.kd_loss(s, t, labels, T) == pytest.approx(forward.item(), rel=1e-5)
    assert distill.kd_loss(s, t, labels, T, "reverse") == pytest.approx(reverse.item(), rel=1e-5)
    assert forward.item() != pytest.approx(reverse.item(), rel=1e-2)


def test_cosine_term_is_one_minus_cosine_of_last_hidden_states(tiny_models, tokenizer):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    student = distill.student_from_teacher(teacher, [0, 1])
    batch = _batch(tokenizer)
    got = _trainer(student, teacher, alpha_cos=1.0).compute_loss(student, batch)
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True).hidden_states[-1][:, :-1]
        t = teacher(**batch, output_hidden_states=True).hidden_states[-1][:, :-1]
    want = (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-4) and 0 < got.item() < 2


def test_teacher_precision():
    cpu = torch.device("cpu")
    assert distill.teacher_dtype("fp32", cpu) == torch.float32
    assert distill.teacher_dtype("bf16", cpu) == torch.bfloat16
    assert distill.teacher_dtype("auto", cpu) == (torch.bfloat16 if models.native_bf16(cpu) else torch.float32)


# --- the stage -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_distill_stage_kd_loss_decreases_and_card_records_teacher(arch, tiny_models, make_recipe):
    path = make_recipe(tiny_models[arch], finetune={"enabled": False},
                       distill={"every": 2, "alpha_kd": 1.0, "alpha_ce": 0.0, "temperature": 1.5})
    r, out = _run(path, ["load"])
    # give the teacher a Hub id, as a real base model has, to see it reach the student's card
    base_record = _record(out["load"])
    base_record["base_model"] = "tiny-org/tiny-teacher"
    (out["load"] / "pipeline.json").write_text(json.dumps(base_record))
    _, out = _run(path, ["distill"])
    rec = _record(out["distill"])
    assert rec["layer_map"] == [0, 2]
    # KD only: the student's distributions move towards the teacher's (a random tiny teacher is close
    # to uniform, so the KL starts small; it still has to shrink a lot)
    assert rec["metrics"]["train_loss_last"] < 0.7 * rec["metrics"]["train_loss_first"], rec["metrics"]
    assert rec["metrics"]["params_ratio"] < 1
    assert rec["loss"] == {"alpha_kd": 1.0, "alpha_ce": 0.0, "alpha_cos": 0.0, "temperature": 1.5,
                           "kl": "forward", "teacher_precision": rec["loss"]["teacher_precision"]}
    assert rec["teacher"]["folder"] == str(r.run_dir / "base") and rec["teacher"]["layers"] == 4
    card = (out["distill"] / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "tiny-org/tiny-teacher" and "distillation" in meta["tags"]
    assert "layers [0, 2] (2 of 4)" in card and "1.0 x forward KD (T=1.5) + 0.0 x CE" in card
    assert "load it with transformers >= 5" in card  # tokenizer files written by transformers 5
    assert str(r.run_dir / "base") in card


def test_distill_stage_fresh_student_with_reverse_kl_and_bf16_teacher(tiny_models, make_recipe):
    spec = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4}
    path = make_recipe(tiny_models["llama"], finetune={"enabled": False},
                       distill={"config": spec, "kl": "reverse", "alpha_cos": 0.5, "teacher_precision": "bf16",
                                "max_steps": 24})  # a fresh student starts from scratch: give it more steps
    _, out = _run(path, ["load", "distill"])
    rec = _record(out["distill"])
    assert rec["layer_map"] is None and rec["student_config"] == spec
    assert rec["loss"]["kl"] == "reverse" and rec["loss"]["teacher_precision"] == "bfloat16"
    assert rec["metrics"]["train_loss_last"] < rec["metrics"]["train_loss_first"] - 0.3, rec["metrics"]
    student = AutoModelForCausalLM.from_pretrained(out["distill"])
    assert type(student).__name__ == "GPT2LMHeadModel" and student.config.n_layer == 2
    assert "Fresh GPT2LMHeadModel student (2 layers, hidden size 64)" in (out["distill"] / "README.md").read_text()


@pytest.mark.parametrize("arch", ARCHS)
def test_unfrozen_parameters_train_only_what_they_match(arch, tiny_models, make_recipe):
    path = make_recipe(tiny_models[arch], finetune={"enabled": False},
                       distill={"every": 2, "alpha_kd": 1.0, "alpha_ce": 0.0, "unfrozen_parameters": ["mlp"],
                                "learning_rate": 1e-2})
    _, out = _run(path, ["load", "distill"])
    before = distill.student_from_teacher(AutoModelForCausalLM.from_pretrained(out["load"]), [0, 2]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out["distill"]).state_dict()
    changed = {name for name, w in after.items() if not torch.equal(w, before[name])}
    assert changed and all("mlp" in name for name in changed), changed
    rec = _record(out["distill"])
    assert rec["unfrozen_parameters"] == ["mlp"]
    mlp = sum(w.numel() for name, w in after.items() if "mlp" in name)
    assert rec["metrics"]["trained_params"] == mlp < rec["metrics"]["params"]


def test_unfrozen_parameters_mistakes_are_named(tiny_models, make_recipe):
    problems = distill.DistillConfig(unfrozen_parameters=["mlp(", "x"]).check()
    assert any("'mlp(' is not a regular expression" in p for p in problems)
    assert any("empty list trains nothing" in p for p in distill.DistillConfig(unfrozen_parameters=[]).check())
    # patterns that match no parameter of the student: test_distill_mistakes_are_named_at_validate


@pytest.mark.parametrize("settings,needle", [
    ({"layers": [0, 9]}, "distill.layers: [9] out of range; the teacher has layers 0..3"),
    ({"keep": 7}, "distill.keep: 7 is more than the teacher's 4 layers"),
    ({"config": {"num_hiden_layers": 2}}, "num_hiden_layers (did you mean num_hidden_layers?) not a setting"),
    ({"config": {"model_type": "lama"}}, "distill.config.model_type: unknown architecture 'lama'"),
    ({"config": {"hidden_size": 32}, "alpha_cos": 0.5}, "the student's hidden size (32) differs"),
    ({"every": 2, "unfrozen_parameters": ["nothing_here"]}, "unfrozen_parameters: ['nothing_here'] match none"),
    # the pruned student's names: a depth cut to 3 layers has no layers.3 (and has layers.2: the fix below)
    ({"unfrozen_parameters": [r"layers\.3\."]}, "unfrozen_parameters: ['layers\\\\.3\\\\.'] match none"),
])
def test_distill_mistakes_are_named_at_validate(settings, needle, tiny_models, make_recipe, capsys):
    """What the stage would refuse after the stages before it ran (minutes or hours) is said by validate, from the
    teacher's config and the student built on the meta device; the same recipe fixed validates."""
    prune = {"enabled": True, "num_hidden_layers": 3} if "layers" in str(settings) and \
        "unfrozen" in str(settings) else {}
    path = make_recipe(tiny_models["llama"], distill=settings, **({"prune": prune} if prune else {}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    fixed = make_recipe(tiny_models["llama"], name="fixed",
                        distill={"unfrozen_parameters": [r"layers\.2\."] if prune else ["mlp"]},
                        **({"prune": prune} if prune else {}))
    assert main(["validate", str(fixed)]) == 0, capsys.readouterr().err


# --- the bench -------------------------------------------------------------------------------

def _bench():
    bench = bench_module("distill")  # bench/distill.py, not the stage

    sys.path.pop(0)
    sys.modules.pop("distill", None)
    return bench


def test_bench_arguments():
    bench = _bench()
    a = bench.parse_args([])
    assert (a.teacher, a.every, a.variants, a.wiki_tokens) == ("smollm2-135m", 2, "kd,ce", 32768)
    a = bench.parse_args(["--smoke", "--train-tokens", "99999", "--alpha-kd", "0.9"])
    assert a.train_tokens == bench.SMOKE["train_tokens"] and a.alpha_kd == 0.9
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "kd,mse"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--train-tokens", "10"])


def test_bench_smoke_run(tiny_models, tmp_path):
    bench = _bench()
    out = tmp_path / "distill.json"
    result = bench.main(["--smoke", "--teacher", str(tiny_models["llama"]), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for name in ("kd", "ce"):
        v = result["variants"][name]
        assert v["train_tokens"] == bench.SMOKE["train_tokens"] and v["layer_map"] == [0, 2]
        assert v["params"] < result["teacher"]["params"]
        for split in ("stdlib", "wikitext2"):
            assert 1 < v["student_ppl"][split] < 2 * 512
            assert v["ratio"][split] == pytest.approx(v["student_ppl"][split] / v["teacher_ppl"][split], rel=1e-3)
    assert result["variants"]["ce"]["alpha_kd"] == 0 and set(result["kd_beats_ce"]) == {"stdlib", "wikitext2"}
    assert result["machine"]["cores"] >= 1 and result["settings"]["smoke"] is True


# --- training controls shared with finetune: evaluation, best model, resume ---------------------------

def test_distill_evaluates_and_keeps_the_best_student(tiny_models, make_recipe):
    path = make_recipe(tiny_models["llama"], finetune={"enabled": False},
                       distill={"eval_steps": 4, "keep_best": True, "progress_bar": False, "report_to": "none"})
    _, out = _run(path, ["load", "distill"])
    m = _record(out["distill"])["metrics"]
    assert m["eval_loss_last"] < m["eval_loss_first"], m  # the distillation loss on validation blocks
    assert m["eval_loss_best"] == min(m["eval_loss_first"], m["eval_loss_last"], m["eval_loss_best"])
    assert m["best_step"] in (4, 8, 12)
    assert not list((out["distill"].parent / ".trainer" / "distill").glob("checkpoint-*")), "cleared when done"


@pytest.mark.slow  # two pipeline processes, one killed: ~30 s on 2 busy cores
def test_killed_distill_resumes_where_it_left_off(tiny_models, make_recipe, tmp_path):
    import signal
    import subprocess
    import time

    settings = dict(finetune={"enabled": False}, quantize={"enabled": False}, evaluate={"enabled": False},
                    distill={"max_steps": 40, "save_steps": 5, "progress_bar": False, "report_to": "none"})
    path = make_recipe(tiny_models["gpt2"], name="killed", **settings)
    assert main(["run", str(path), "--stages", "load"]) == 0
    ckpts = tmp_path / "runs" / "killed" / ".trainer" / "distill"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not any(
            json.loads(p.read_text())["step"] >= 10 for p in ckpts.glob("checkpoint-*/pipeline-checkpoint.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert main(["run", str(path)]) == 0
    resumed = _record(tmp_path / "runs" / "killed" / "distill")["metrics"]
    assert int(resumed["resumed_from"].split("-")[1]) >= 10 and resumed["train_steps"] == 40
    straight = make_recipe(tiny_models["gpt2"], name="straight", **settings)
    assert main(["run", str(straight)]) == 0
    reference = _record(tmp_path / "runs" / "straight" / "distill")["metrics"]
    assert resumed["train_loss_last"] == pytest.approx(reference["train_loss_last"], abs=1e-5)


def test_own_text_is_written_once_and_mixed_into_calibration_and_distillation(tiny_models, make_recipe):
    from pipeline import general, runner

    settings = {"tokens": 256, "length": 32, "batch_size": 4}
    sections = {"finetune": {"enabled": False},
                "prune": {"enabled": True, "target_params": 0.7, "axes": ["mlp"], "round_to": 8,
                          "calibration_blocks": 8, "own_text": settings},
                "distill": {"own_text": settings}}
    path = make_recipe(tiny_models["llama"], **sections)
    r, out = _run(path, ["load", "prune", "distill"])
    written = list((r.run_dir / "own-text").glob("*.jsonl"))
    assert len(written) == 1  # the model prune cuts is the teacher distill heals from: one text for both
    written = written[0]
    docs = [json.loads(line)["text"] for line in written.read_text().splitlines()]
    assert len(docs) == 256 // 32 and all(d.strip() for d in docs)
    # the model's own continuations of its start token, with the run's seed (not some other model's text)
    teacher, tok = formats.load_folder(r.run_dir / "base")
    again = general.continuations(teacher, tok, [None] * 8, 32, 0.95, r.seed, 4)
    assert [t.strip() for t in again] == docs
    assert _record(out["prune"])["calibration"]["mix"] == [str(written)]
    rec = _record(out["distill"])
    assert rec["distill_data"]["mix"][-1]["source"] == str(written)
    drawn = rec["distill_data"]["train_blocks"]
    assert drawn[written.name] > 0 and drawn[rec["distill_data"]["label"]] > 0, drawn
    # kept while the model and the settings are unchanged; written anew when they change
    stamp = written.stat().st_mtime_ns
    runner.run(r, ["distill"], force=True)
    assert written.stat().st_mtime_ns == stamp
    path = make_recipe(tiny_models["llama"], **{**sections, "distill": {"own_text": {**settings, "top_p": 0.5}}})
    _run(path, ["distill"])
    new = [f for f in (r.run_dir / "own-text").glob("*.jsonl") if f != written]
    assert len(new) == 1 and json.loads(new[0].with_suffix(".json").read_text())["top_p"] == 0.5
    assert _record(r.run_dir / "distill")["distill_data"]["mix"][-1]["source"] == str(new[0])


def test_own_text_mistakes_are_named(tiny_models, make_recipe, capsys):
    cases = [
        ({"distill": {"own_text": {"tokens": -1}}}, "distill.own_text.tokens: -1 must be 0 (none) or more"),
        ({"distill": {"own_text": {"tokens": 64, "weight": 0}}}, "distill.own_text.weight: 0"),
        ({"distill": {"own_text": {"tokens": 64, "prompts": [" "]}}}, "distill.own_text.prompts"),
        ({"distill": {"own_text": {"top_p": 0.5}}}, "distill.own_text.tokens is 0 (the default)"),
        ({"prune": {"enabled": True, "target_params": 0.7, "own_text": {"length": 8}}},
         "prune.own_text.tokens is 0 (the default)"),
        ({"data": {"format": "chat"}, "prune": {"enabled": True, "target_params": 0.7, "own_text": {"tokens": 64}}},
         "prune.own_text: the model's own text is mixed into text data only"),
        ({"data": {"format": "chat"}, "distill": {"own_text": {"tokens": 64}}},
         "distill.own_text: the model's own text is mixed into text data only"),
    ]
    for sections, expected in cases:
        path = make_recipe(tiny_models["llama"], **sections)
        assert main(["validate", str(path)]) == 2
        assert expected in capsys.readouterr().err, sections


def test_writing_a_models_text_leaves_the_callers_random_stream_alone(tiny_models):
    from pipeline import general

    model, tok = formats.load_folder(tiny_models["llama"])
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = general.continuations(model, tok, [None, None], 8, 0.95, 123, 2)
    assert torch.equal(torch.rand(3), expected)
    assert general.continuations(model, tok, [None, None], 8, 0.95, 123, 2) == first  # its own seed decides it
