"""Bench scripts: argument parsing and a tiny-model smoke run each (the real runs are too slow for CI)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import bench_module

ROOT = Path(__file__).resolve().parents[1]


def _smoke(script: str, tmp_path, *extra) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), "--smoke", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["cores"] >= 1 and result["settings"]
    return result


def test_evaluate_bench_args_and_smoke(tmp_path):
    bench_evaluate = bench_module("evaluate")

    args = bench_evaluate.parse_args(["--tokens", "100", "--batch-size", "2"])
    assert args.tokens == 100 and args.batch_size == 2 and not args.smoke
    result = _smoke("evaluate", tmp_path, "--tokens", "300", "--context", "64", "--stride", "32", "--rounds", "1")
    assert result["ours_tok_s"] > 0 and result["guide_tok_s"] > 0 and result["same_scored_tokens"]
    assert result["ours_ppl"] == pytest.approx(result["guide_ppl"], rel=1e-4)


def test_e2e_bench_args():
    e2e = bench_module("e2e")

    args = e2e.parse_args(["finetune.max_steps=3", "--smoke"])
    assert args.overrides == ["finetune.max_steps=3"] and args.smoke


@pytest.mark.slow
def test_e2e_bench_smoke(tmp_path):
    result = _smoke("e2e", tmp_path)
    assert list(result["stages"]) == ["load", "finetune", "prune", "distill", "quantize", "evaluate"]
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 100 for s in result["stages"].values())
    report = result["report"]  # the run's own report, so the README can say what the time bought
    assert list(report) == ["base", "finetune", "prune", "distill", "quantize"]
    assert all(m["perplexity"] > 1 and m["params"] > 0 for m in report.values())
    assert report["prune"]["params"] < report["finetune"]["params"]
    assert report["quantize"]["chosen"]  # the candidate the run shipped, named in the README's table


def test_finetune_bench_args():
    bench_finetune = bench_module("finetune")

    args = bench_finetune.parse_args(["--methods", "full", "--steps", "5"])
    assert args.methods == "full" and args.steps == 5 and args.rounds == 2


@pytest.mark.slow
def test_finetune_bench_smoke(tmp_path):
    result = _smoke("finetune", tmp_path, "--methods", "full", "--rounds", "1", "--steps", "3")
    full = result["full"]
    assert full["ours_tok_s"] > 0 and full["baseline_tok_s"] > 0 and full["ratio"] > 0
    assert full["peak_mem_mb"]["ours"] > 100


def test_cpu_speed_bench_args_and_smoke(tmp_path):
    cpu_speed = bench_module("cpu_speed")

    args = cpu_speed.parse_args(["--steps", "5", "--variants", "1-thread"])
    assert args.steps == 5 and args.variants == "1-thread"
    result = _smoke("cpu_speed", tmp_path, "--steps", "4", "--block-size", "64", "--variants", "default,padded-documents")
    default, padded = (result["variants"][k] for k in ("default", "padded-documents"))
    assert default["tok_s"] > 0 and default["speedup"] == 1.0
    assert default["real_tokens_per_step"] == 4 * 64  # packed: every token of every block is real
    assert padded["real_tokens_per_step"] < 4 * 64  # padded: short documents leave padding in the block


def test_readme_benchmark_tables_match_the_committed_results():
    readme_table = bench_module("readme_table")

    assert readme_table.main(["--check"]) == 0, "run: python bench/readme_table.py"


def test_precision_bench_args_and_smoke(tmp_path):
    precision = bench_module("precision")

    assert precision.parse_args(["--smoke"]).smoke
    result = _smoke("precision", tmp_path)
    assert result["fp32"]["perplexity"] > 1 and result["bf16"]["perplexity"] > 1
    assert result["fp32"]["base_perplexity"] == result["bf16"]["base_perplexity"]  # same base, same windows


def test_compress_bench_schema_on_a_tiny_teacher(tmp_path):
    compress = bench_module("compress")

    with pytest.raises(SystemExit):
        compress.parse_args(["--variants", "width-80,shrink-everything"])
    result = _smoke("compress", tmp_path, "--variants", "uniform-60,width-80,mix-60", "--refit", "both",
                    "--work", str(tmp_path / "runs"))
    teacher = result["teacher"]
    assert teacher["params"] > 0 and set(teacher["ppl"]) == {"validation", "wikitext-2-test"}
    assert set(result["variants"]) == {"uniform-60", "width-80", "mix-60"}
    for name, v in result["variants"].items():
        assert 0.3 < v["params_ratio"] < 0.9 and v["kd_tokens"] > 0
        for text in ("validation", "wikitext-2-test"):
            assert v["ratio"][text] == pytest.approx(v["after_kd"][text] / teacher["ppl"][text], rel=1e-2)
            assert v["zero_shot"][text] > 1
    assert set(result["variants"]["width-80"]["zero_shot_by_refit"]) == {"refit", "no_refit"}
    assert (tmp_path / "compress.png").is_file()


def test_gguf_grid_bench_sees_a_fine_tune_snap_back_to_its_grid(tmp_path):
    # Base weights on a Q4_1 grid, nudged by far less than a step: Q4_1 rounds the nudge away, Q8_0 keeps it.
    args = bench_module("gguf_grid").parse_args(["--types", "q8_0,q4_1"])
    assert args.types == "q8_0,q4_1" and not args.smoke
    result = _smoke("gguf_grid", tmp_path, "--types", "q8_0,q5_0,q4_1")
    kept = {t: v["kept"] for t, v in result["types"].items()}
    assert kept["q4_1"] < 0.3 and kept["q8_0"] > 0.9 and kept["q5_0"] > 0.5, kept
    assert result["types"]["q8_0"]["error"] < result["types"]["q5_0"]["error"]
    assert result["settings"]["matrices"] > 0 and 0 < result["finetune_change"] < 0.05


def test_sparsity_bench_schema_on_a_tiny_teacher(tmp_path):
    bench_sparsity = bench_module("sparsity")
    with pytest.raises(SystemExit):
        bench_sparsity.parse_args(["--variants", "3:4-sparsegpt"])
    result = _smoke("sparsity", tmp_path, "--work", str(tmp_path / "runs"), "--variants", "2:4-sparsegpt")
    variant = result["variants"]["2:4-sparsegpt"]
    assert variant["sparsity"] == pytest.approx(0.5, abs=0.01)
    for row in ("zero_shot", "healed"):  # healing on the fixed mask keeps the zeros
        assert set(variant[row]["ppl"]) == set(result["teacher"]["ppl"])
        codec = variant[row]["forms"]["codec"]
        assert variant[row]["forms"][f"bitmask_int8_{codec}"] < result["teacher"]["forms"][f"dense_int8_{codec}"]
    assert variant["healed"]["sparsity"] >= variant["sparsity"]
    assert set(variant["targets_met"]) >= {"validation", "size"}
    assert variant["int8_compressed_vs_dense_int8_compressed"] < 1
    assert {"size_share", "dominates", "dominated_by"} <= set(variant["frontier"])
    # the frontier: a cut no bigger and no worse on every scored text dominates a row; a bigger, worse one is beaten
    cuts = {"small-good": {"params_ratio": 0.4, "ratio": {"validation": 1.0}},
            "big-bad": {"params_ratio": 0.9, "ratio": {"validation": 3.0}}}
    place = bench_sparsity.frontier(0.6, {"validation": 1.5}, cuts)
    assert place["dominated_by"] == ["small-good"] and place["dominates"] == ["big-bad"]


def test_sparse_speed_bench_schema_on_a_tiny_model(tmp_path):
    """OpenVINO W8A8 of a dense and a 50%-sparse tiny Llama, timed with sparse weight decompression off and on: the
    zeros reach the exported weights, int8 activations keep the perplexity near fp32's, and the packed weights
    compute the same logits as the unpacked ones (the speed itself is measured only by the real run)."""
    result = _smoke("sparse_speed", tmp_path)
    dense, sparse = result["models"]["dense"], result["models"]["50% magnitude"]
    assert dense["block_weight_zeros"] < 0.01 < 0.3 < sparse["block_weight_zeros"]
    for row in (dense, sparse):
        assert row["validation_ppl_w8a8"] == pytest.approx(row["validation_ppl_fp32"], rel=0.05)
        assert row["rate_0.5"]["max_abs_logit_diff_vs_off"] < 1e-3
        assert row["rate_off"]["prefill_256_ms"] > 0 and row["speedup_prefill"] > 0
        assert not any("sparse" in k for k in row["rate_off"]["prefill_256_fc_kernels"])  # off means off
        assert row["sparse_fc_at_0.5"].split(" of ")[1] == str(sum(row["rate_0.5"]["prefill_256_fc_kernels"].values()))
    assert isinstance(result["amx"], bool) and result["openvino"]


def test_sparse_bound_bench_on_a_tiny_model(tmp_path):
    """Every variant has the zeros it asks for; the codec never beats the order-0 bound; a sparse embedding and the
    cheaper 2:4 mask each make the bound smaller, the order the docs' argument rests on."""
    result = _smoke("sparse_bound", tmp_path)
    rows = result["variants"]
    for row in rows.values():
        assert row["block_weight_zeros"] == pytest.approx(0.5, abs=0.01)
        assert row["int8_bound_mb"] <= row["int8_coded_mb"] and 0.5 < row["bound_vs_dense_bound"] < 1
    unstructured, two_four = rows["50% unstructured (Wanda)"], rows["2:4 (Wanda)"]
    assert two_four["bound_vs_dense_bound"] < unstructured["bound_vs_dense_bound"]
    assert rows["50% unstructured (Wanda), embedding 50% too"]["bound_vs_dense_bound"] < unstructured["bound_vs_dense_bound"]


def test_sparse_cuda_bench_measures_2_4_kernels_or_says_why_not(tmp_path):
    """PyTorch's 2:4 kernels: on a CUDA GPU of capability >= 8.0 the sparse student computes its dense self's
    logits and both are timed; anywhere else the JSON says why nothing was timed (this machine: no GPU)."""
    import torch

    from pipeline import sparsity

    sparse_cuda = bench_module("sparse_cuda")
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]])  # which weights it swaps
    assert sparsity.fits_pattern(w, (2, 4)) and not sparsity.fits_pattern(w + 1, (2, 4))
    assert not sparsity.fits_pattern(w[:, :6], (2, 4))
    result = _smoke("sparse_cuda", tmp_path)
    if sparse_cuda.unavailable() is not None:
        assert result["skipped"] == sparse_cuda.unavailable() and "saves disk, not time" in result["note"]
    else:
        assert result["linears_swapped"] > 0 and result["max_abs_logit_diff"] < 0.05
        assert all(result["dense_ms"][k] > 0 and result["speedup"][k] > 0 for k in ("prefill", "decode_like"))


def test_heal_bench_args():
    heal = bench_module("heal")
    for bad in (["--budgets", "0"], ["--budgets", "x"], ["--settings", "web-text"], ["--variants", "uniform-60"]):
        with pytest.raises(SystemExit):
            heal.parse_args(bad)
    args = heal.parse_args(["--budgets", "1,4"])
    assert args.budgets == [1, 4] and args.variants == "width-80"


@pytest.mark.slow  # four compress runs on a tiny teacher: ~1 min
def test_heal_bench_smoke(tmp_path):
    result = _smoke("heal", tmp_path, "--budgets", "1,2", "--work", str(tmp_path / "runs"))
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {f"width-80-{s}-{b}x" for s in ("recipe-text", "own-text") for b in (1, 2)}
    for run in runs.values():
        assert run["ratio"]["validation"] == pytest.approx(
            run["after_kd"]["validation"] / result["teacher"]["ppl"]["validation"], rel=1e-2)
    assert runs["width-80-own-text-2x"]["kd_tokens"] == 2 * runs["width-80-own-text-1x"]["kd_tokens"]
    record = json.loads((tmp_path / "runs" / "width-80-own-text-1x" / "compress-width-80" / "distill" /
                         "pipeline.json").read_text())
    assert any(name.startswith("own-text-") for name in record["distill_data"]["train_blocks"])


def test_grid_bench_args():
    grid = bench_module("grid")
    for bad in (["--keeps", "50"], ["--keeps", "x"], ["--budgets", "0"], ["--types", "int3"]):
        with pytest.raises(SystemExit):
            grid.parse_args(bad)
    args = grid.parse_args([])
    assert args.keeps == [100, 90, 80, 70, 60] and args.budgets == [1, 4] and args.types == grid.TYPES


@pytest.mark.slow  # a tiny teacher, one cut healed, two models through bench/quantize.py: ~1 min
def test_grid_bench_smoke(tmp_path):
    work = ["--work", str(tmp_path / "work"), "--heal-work", str(tmp_path / "heal")]
    result = _smoke("grid", tmp_path, "--keeps", "100,80", "--budgets", "1", "--types", "openvino-int8,gguf-q4_1",
                    *work)
    pts = {p["name"]: p for p in result["points"]}
    assert {"finetune/fp32", "finetune/openvino-int8", "width-80-1x/fp32", "width-80-1x/openvino-int8"} <= set(pts)
    assert pts["finetune/fp32"]["ratio"] == {"stdlib-validation": 1.0, "wikitext-2-test": 1.0}
    assert pts["width-80-1x/fp32"]["disk_mb"] < pts["finetune/fp32"]["disk_mb"]
    for p in pts.values():  # dominance as pipeline/frontier.py says it, on both texts
        by = p.get("dominated_by")
        if by:
            assert pts[by]["disk_mb"] <= p["disk_mb"]
            assert all(pts[by]["quality"][t] <= p["quality"][t] for t in p["quality"])
    assert (tmp_path / "grid.png").is_file()
    # a second run reuses every student and quantize JSON: it trains and converts nothing
    made = [*(tmp_path / "work").glob("quantize-*.json"), *(tmp_path / "heal").rglob("model.safetensors")]
    stamps = {f: f.stat().st_mtime_ns for f in made}
    assert len(list((tmp_path / "work").glob("quantize-*.json"))) == 2  # the fine-tuned model and one student
    again = _smoke("grid", tmp_path, "--keeps", "100,80", "--budgets", "1", "--types", "openvino-int8,gguf-q4_1",
                   *work)
    assert again["points"] == result["points"] and {f: f.stat().st_mtime_ns for f in made} == stamps
    # a grid cut short: --measured-only gathers what is there and lists the rest, making nothing
    cut = _smoke("grid", tmp_path, "--keeps", "100,80,60", "--budgets", "1,2", "--types", "openvino-int8,gguf-q4_1",
                 "--measured-only", *work)
    assert cut["points"] == result["points"] and cut["missing"] == ["width-60-1x", "width-80-2x", "width-60-2x"]
    assert {f: f.stat().st_mtime_ns for f in made} == stamps and not (tmp_path / "heal" / "width-60-recipe-text-1x").exists()
    # a fresh checkout: --reuse keeps an earlier grid's points for what --work lacks, checking the teacher first
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(result))
    (tmp_path / "work" / "quantize-width-80-1x.json").unlink()
    shutil.rmtree(tmp_path / "heal")
    reused = _smoke("grid", tmp_path, "--keeps", "100,80", "--budgets", "1", "--types", "openvino-int8,gguf-q4_1",
                    "--reuse", str(earlier), *work)
    assert reused["points"] == result["points"] and reused["settings"]["reused"]["models"] == ["finetune", "width-80-1x"]
    assert not (tmp_path / "heal").exists() and not (tmp_path / "work" / "quantize-width-80-1x.json").exists()
    result["teacher"]["ppl"]["stdlib-validation"] *= 1.01  # measured against another model: refused
    earlier.write_text(json.dumps(result))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "grid.py"), "--smoke", "--out", str(tmp_path / "x.json"),
                           "--keeps", "100,80", "--budgets", "1", "--reuse", str(earlier), *work],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "--reuse" in proc.stderr and not (tmp_path / "x.json").exists()
