"""The frontier: KL divergence and top-1 agreement, the run's general English, several quantize inputs competing
under budgets, dominated models marked."""
import json

import pytest
import torch
import torch.nn.functional as F

from pipeline import data, formats, frontier, general, recipe
from pipeline.cli import main
from pipeline.metrics import perplexity, score
from pipeline.stages import quantize
from tiny import build_model, record as _record

GATE = {"context": 64, "stride": 32, "max_tokens": 512, "speed_tokens": 4}


def _hand_kl(a, b, ids, n, context, stride):
    """KL(a || b) and top-1 agreement at tokens 1..n, each predicted from the window that first scores it."""
    kl = agree = 0.0
    with torch.no_grad():
        for j in range(n):
            t, begin = j + 1, 0
            while begin + context <= t:
                begin += stride
            x = torch.tensor([ids[begin:t]])
            pa, pb = (F.log_softmax(m(x).logits[0, -1], -1) for m in (a, b))
            kl += (pa.exp() * (pa - pb)).sum().item()
            agree += float(pa.argmax() == pb.argmax())
    return kl / n, agree / n


def test_kl_and_top1_equal_a_hand_written_loop(tokenizer):
    from pydoc_data.topics import topics

    a = build_model("gpt2", tokenizer).eval()
    b = build_model("gpt2", tokenizer).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = tokenizer(topics["if"] + topics["while"] + topics["for"])["input_ids"][:600]
    # the reference pass runs over fewer tokens than the model's: positions still line up
    _, ref = score(a, ids, 64, 32, max_tokens=300, keep=200)
    assert ref.shape == (200, len(tokenizer))
    result, _ = score(b, ids, 64, 32, reference=ref, batch_size=3)
    kl, top1 = _hand_kl(a, b, ids, 200, 64, 32)
    assert result["kl_tokens"] == 200
    assert result["kl"] == pytest.approx(kl, rel=1e-4) and result["kl"] > 0.01
    assert result["top1"] == pytest.approx(top1)
    assert result["perplexity"] == pytest.approx(perplexity(b, ids, 64, 32)["perplexity"], rel=1e-6)
    same, _ = score(a, ids, 64, 32, reference=ref)
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1"] == 1.0


def test_dominance():
    small_good = {"name": "a", "disk_mb": 10, "quality": {"val": 5.0, "gen": 9.0}}
    big_bad = {"name": "b", "disk_mb": 20, "quality": {"val": 6.0, "gen": 9.0}}
    big_better_general = {"name": "c", "disk_mb": 20, "quality": {"val": 6.0, "gen": 8.0}}
    twin = {"name": "d", "disk_mb": 10, "quality": {"val": 5.0, "gen": 9.0}}
    pts = frontier.mark([small_good, big_bad, big_better_general, twin])
    assert big_bad["dominated_by"] == "a"  # larger and worse in-domain, equal on general
    assert "dominated_by" not in big_better_general  # larger, but better on general English: on the frontier
    assert "dominated_by" not in small_good and "dominated_by" not in twin  # equal is not dominated
    assert "no smaller and no better than a" in frontier.describe(big_bad, small_good)
    assert len(pts) == 4
    # a file 0.05% smaller (some kilobytes of one architecture and type) but worse is dominated: sizes within
    # frontier.SIZE_TOLERANCE count as equal; 0.5% smaller is a real size difference
    healed_more = {"name": "e", "disk_mb": 61.39, "quality": {"val": 14.2, "gen": 84.3}}
    healed_less = {"name": "f", "disk_mb": 61.36, "quality": {"val": 17.3, "gen": 92.2}}
    smaller = {"name": "g", "disk_mb": 61.08, "quality": {"val": 17.4, "gen": 92.3}}
    frontier.mark([healed_more, healed_less, smaller])
    assert healed_less["dominated_by"] == "e" and "dominated_by" not in smaller and "dominated_by" not in healed_more


@pytest.fixture(scope="module")
def chain_run(tiny_models, tmp_path_factory):
    """finetune -> prune -> distill -> quantize with the default inputs: the student and the fine-tuned model."""
    import yaml

    from conftest import TINY_SECTIONS

    tmp = tmp_path_factory.mktemp("frontier")
    body = {"model": str(tiny_models["llama"]), "name": "tiny", "output_dir": str(tmp / "runs"), "check_source": False,
            **{k: dict(v) for k, v in TINY_SECTIONS.items()}}
    body["prune"] = {"enabled": True, "target_params": 0.7, "axes": ["mlp"], "calibration_blocks": 8}
    # the gate's windows equal evaluate's, so evaluate reuses what the gate measured
    body["quantize"] = {**GATE, "max_tokens": body["evaluate"]["max_tokens"], "max_ppl_increase": None,
                        "candidates": [{"method": "bnb-int8"}, {"method": "bnb-nf4"}]}
    body["evaluate"] = {**body["evaluate"], "speed": False, "samples": False, "task": {"enabled": False}}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(body))
    assert main(["run", str(path)]) == 0
    return path, tmp / "runs" / "tiny"


def test_quantize_tries_every_candidate_on_the_student_and_the_fine_tuned_model(chain_run):
    path, run_dir = chain_run
    rec = _record(run_dir / "quantize")
    rows = {r["name"]: r for r in rec["candidates"]}
    label = recipe.load(path).data.label
    assert set(rows) == {"distill/bnb-int8", "distill/bnb-nf4", "finetune/bnb-int8", "finetune/bnb-nf4"}
    assert [i["name"] for i in rec["inputs"]] == ["finetune", "distill"]  # the reference is scored first
    assert rec["reference"]["name"] == "finetune" and rec["reference"]["kl"] == 0.0
    for r in rows.values():
        assert r["status"] == "passed" and list(r["quality"]) == [label, general.LABEL]
        assert 0 <= r["kl"] and 0 < r["top1"] <= 1
        assert r["ppl_increase_pct"] == pytest.approx(100 * (r["perplexity"] / rec["reference"]["perplexity"] - 1),
                                                      abs=1e-3)
    # the student's candidates are further from the fine-tuned model than the fine-tuned model's own int8
    assert rows["distill/bnb-int8"]["kl"] > rows["finetune/bnb-int8"]["kl"]
    # prefer size, no budget: the smallest candidate ships, and the record names its input as the parent
    smallest = min(rows.values(), key=lambda r: (r["disk_mb"], r["perplexity"]))
    assert rec["chosen"] == smallest["name"] and rec["parent"] == str(run_dir / smallest["input"])
    assert rec["metrics"]["bound_by"] == []
    # the shipped folder and the report agree with the gate
    report = {r["name"]: r for r in json.loads((run_dir / "report.json").read_text())["models"]}
    assert report["quantize"]["disk_mb"] == pytest.approx(smallest["disk_mb"], abs=0.01)
    md = (run_dir / "report.md").read_text()
    assert "## Frontier: size against quality" in md and "**shipped**" in md and f"KL {label}" in md
    assert f"ppl {general.LABEL}" in md and f"top-1 {label}" in md
    # the frontier lists the stage folders and the candidates that were not shipped
    for name in set(rows) - {rec["chosen"]}:
        assert f"| {name} (candidate) |" in md


def test_each_budget_type_binds_the_winner(chain_run):
    _, run_dir = chain_run
    rec = _record(run_dir / "quantize")
    rows, ref = rec["candidates"], rec["reference"]
    cfg = quantize.QuantizeConfig
    base_mb = formats.disk_mb(run_dir / "base")

    def winner(**budget):
        fresh = [dict(r) for r in rows]
        return quantize.gate(fresh, ref, cfg(max_ppl_increase=None, **budget), base_mb), fresh

    by_size = sorted(rows, key=lambda r: r["disk_mb"])
    # max_mb between the two smallest sizes: only candidates at or under it ship
    limit = (by_size[0]["disk_mb"] + by_size[-1]["disk_mb"]) / 2
    w, _ = winner(max_mb=limit)
    assert w["disk_mb"] <= limit
    w, fresh = winner(max_mb=by_size[0]["disk_mb"] / 2)
    assert w is None and all("max_mb" in v for r in fresh for v in r["violates"])
    # max_kl: the tightest KL any candidate has lets only that one through
    tight = min(r["kl"] for r in rows)
    w, fresh = winner(max_kl=tight)
    assert w["kl"] == tight
    assert quantize.bound(fresh, w, cfg(prefer="size")) == (["max_kl"] if any(
        r["disk_mb"] < w["disk_mb"] for r in rows) else [])
    # quality losses on the general text
    general_tight = min(r["general_ppl_increase_pct"] for r in rows)
    w, _ = winner(max_general_ppl_increase=general_tight)
    assert w["general_ppl_increase_pct"] == general_tight
    # speed and size share
    slowest = min(r["gen_tok_s"] for r in rows)
    w, fresh = winner(min_gen_tok_s=max(r["gen_tok_s"] for r in rows) + 1)
    assert w is None and all(any(v.startswith("min_gen_tok_s") for v in r["violates"]) for r in fresh)
    w, _ = winner(min_gen_tok_s=slowest)
    assert w is not None
    w, _ = winner(max_size_share=by_size[0]["disk_mb"] / base_mb)
    assert w["disk_mb"] == by_size[0]["disk_mb"]
    w, fresh = winner(max_size_share=by_size[0]["disk_mb"] / base_mb / 2)
    assert w is None and all(any(v.startswith("max_size_share") for v in r["violates"]) for r in fresh)


def test_general_text_is_written_once_scored_and_never_trained_on(chain_run):
    path, run_dir = chain_run
    text = (run_dir / "general" / "general.txt").read_text()
    assert len(text.split()) > 50 and general.PROMPTS[0] in text
    stamp = (run_dir / "general" / "general.txt").stat().st_mtime_ns
    r = recipe.load(path)
    assert general.text(r.general, run_dir, r.seed) == text  # read back, not written again
    assert (run_dir / "general" / "general.txt").stat().st_mtime_ns == stamp
    # not in the training data: no paragraph of it occurs in the train split the stages read
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "base")
    train = tok.decode(data.eval_stream(data.prepare(r.data, tok, r.seed)["train"]))
    paragraphs = [p for p in text.split("\n\n") if len(p) > 80]
    assert len(paragraphs) >= 5
    for paragraph in paragraphs:
        middle = len(paragraph) // 2
        assert paragraph[middle : middle + 40] not in train
    # every model of the report was scored on it, and evaluate compared each with the fine-tuned model
    report = json.loads((run_dir / "report.json").read_text())["models"]
    for row in report:
        names = [e["dataset"] for e in row["evaluations"]]
        assert names == [r.data.label, general.LABEL]
        assert row["reference"] == "finetune" and all("kl" in e for e in row["evaluations"])
    by_name = {row["name"]: row for row in report}
    assert by_name["finetune"]["evaluations"][0]["kl"] == 0.0
    assert by_name["base"]["evaluations"][1]["kl"] > 0  # the fine-tune moved away from the base on general text


def test_a_task_column_that_cannot_separate_models_says_so():
    from pipeline import report

    def row(name, acc, err=0.05):
        return {"name": name, "tasks": {"t": {"acc": acc, "stderr": {"acc": err}}}}

    close = [row("base", 0.767), row("finetune", 0.800), row("quantize", 0.783)]
    note = report.within_noise(close, "t", "acc")
    assert note and "0.767 to 0.800" in note
    assert any("cannot tell these models apart" in line for line in report.task_notes(close, [("t", "acc")]))
    apart = [row("base", 0.50), row("finetune", 0.80)]
    assert report.within_noise(apart, "t", "acc") is None
    assert report.within_noise([row("base", 0.5)], "t", "acc") is None


def test_a_measurement_is_taken_once(chain_run, monkeypatch):
    path, run_dir = chain_run
    report = {r["name"]: r for r in json.loads((run_dir / "report.json").read_text())["models"]}
    # the quantize gate scored the fine-tuned model, the student and the shipped candidate: evaluate reused that
    for name in ("finetune", "distill", "quantize"):
        assert {e["measured_in"] for e in report[name]["evaluations"]} == {"quantize"}, name
    assert {e["measured_in"] for e in report["base"]["evaluations"]} == {"evaluate"}
    assert report["quantize"]["evaluations"][0]["perplexity"] == pytest.approx(
        _record(run_dir / "quantize")["metrics"]["perplexity"], rel=1e-9)
    # a second evaluate with other report settings (samples on) scores no text again
    from pipeline import scoring

    calls = []
    real = scoring.score
    monkeypatch.setattr(scoring, "score", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert main(["run", str(path), "--stages", "evaluate", "evaluate.samples=true"]) == 0
    assert calls == []
    rows = json.loads((run_dir / "report.json").read_text())["models"]
    assert all(r["samples"] for r in rows)
    # --force measures again
    assert main(["run", str(path), "--stages", "evaluate", "evaluate.samples=true", "--force"]) == 0
    assert len(calls) >= 2 * len(rows)


def test_a_stage_forced_to_run_again_is_measured_again(chain_run):
    """Same recipe, same record fingerprint, new weight files: the measurement store does not answer for them."""
    path, run_dir = chain_run
    assert main(["run", str(path), "--stages", "finetune", "--force"]) == 0
    assert main(["run", str(path), "--stages", "evaluate"]) == 0
    rows = {r["name"]: r for r in json.loads((run_dir / "report.json").read_text())["models"]}
    assert {e["measured_in"] for e in rows["finetune"]["evaluations"]} == {"evaluate"}


def test_an_input_over_a_quality_budget_is_not_quantized(chain_run, tmp_path):
    """Quantizing adds error: an input that breaks a quality budget unquantized gets no conversions (its rows say
    why), unless try_over_budget_inputs asks for them. Runs last in this file and restores the quantize folder."""
    import shutil

    path, run_dir = chain_run
    rec = _record(run_dir / "quantize")
    inputs = {i["name"]: i for i in rec["inputs"]}
    int8 = next(r for r in rec["candidates"] if r["name"] == "finetune/bnb-int8")
    assert inputs["distill"]["kl"] > int8["kl"]
    limit = (inputs["distill"]["kl"] + int8["kl"]) / 2  # the fine-tuned model's int8 meets it, the student cannot
    shutil.copytree(run_dir / "quantize", tmp_path / "kept")
    try:
        assert main(["run", str(path), "--stages", "quantize", f"quantize.max_kl={limit}"]) == 0
        rows = {r["name"]: r for r in _record(run_dir / "quantize")["candidates"]}
        for name in ("distill/bnb-int8", "distill/bnb-nf4"):
            assert rows[name]["status"] == "skipped" and "disk_mb" not in rows[name]
            assert "distill itself breaks max_kl" in rows[name]["error"]
        assert rows["finetune/bnb-int8"]["status"] == "passed"
        assert _record(run_dir / "quantize")["parent"] == str(run_dir / "finetune")
        passed = sum(r["status"] == "passed" for r in rows.values())
        assert (f"among the {passed} of {len(rows)} candidates that met every budget" in
                _record(run_dir / "quantize")["summary"]), _record(run_dir / "quantize")["summary"]
        assert "2 of them skipped because their input already breaks a quality budget" in \
            _record(run_dir / "quantize")["summary"]
        # asked for: the student's candidates are converted and scored, and fail the budget on their own numbers
        assert main(["run", str(path), "--stages", "quantize", f"quantize.max_kl={limit}",
                     "quantize.try_over_budget_inputs=true"]) == 0
        rows = {r["name"]: r for r in _record(run_dir / "quantize")["candidates"]}
        assert rows["distill/bnb-int8"]["status"] == "over budget" and rows["distill/bnb-int8"]["kl"] > limit
        # every input over budget: a clear error, not "no candidate could be made"
        assert main(["run", str(path), "--stages", "quantize", "quantize.inputs=[distill]",
                     f"quantize.max_kl={limit}"]) == 2
    finally:
        shutil.rmtree(run_dir / "quantize", ignore_errors=True)
        shutil.copytree(tmp_path / "kept", run_dir / "quantize")
