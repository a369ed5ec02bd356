"""Quantization methods on SmolLM2-135M, fp32 and every method in one run: perplexity on the stdlib
validation split and the start of WikiText-2 test, size on disk, prefill and greedy-generate tokens/s
(same prompts for every model); writes bench/results/quantize.json.

Speed is measured after all conversions, in rounds that visit every model in turn, and the median
per model is reported: on a machine shared with other jobs the load drifts over a long run, and
timing each model once, minutes apart, skews every ratio to fp32."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import common

# Named candidates: the quantize stage's Candidate options. int4 variants: data-free round-to-nearest,
# then NNCF's data-aware algorithms on calibration blocks from the stdlib training split (the quick start's
# training data; the validation split and WikiText-2 are what is scored).
CALIBRATED = {"calibration_samples": 128}
PRESETS = {
    "bnb-int8": {"method": "bnb-int8"},
    "bnb-nf4": {"method": "bnb-nf4"},
    "bnb-fp4": {"method": "bnb-fp4"},
    "openvino-int8": {"method": "openvino-int8"},
    "openvino-int4": {"method": "openvino-int4"},  # data-free, group 128 adjusted per layer
    "int4-g32": {"method": "openvino-int4", "group_size": 32},
    "int4-g32-awq": {"method": "openvino-int4", "group_size": 32, "awq": True, **CALIBRATED},
    "int4-g32-se": {"method": "openvino-int4", "group_size": 32, "scale_estimation": True, **CALIBRATED},
    "int4-g32-awq-se": {"method": "openvino-int4", "group_size": 32, "awq": True, "scale_estimation": True,
                        **CALIBRATED},
    "int4-g32-gptq": {"method": "openvino-int4", "group_size": 32, "gptq": True, "scale_estimation": True,
                      **CALIBRATED},
    "int4-g32-lora": {"method": "openvino-int4", "group_size": 32, "lora_correction": True, **CALIBRATED},
    "int4-g32-awq-se-r80": {"method": "openvino-int4", "group_size": 32, "awq": True, "scale_estimation": True,
                            "ratio": 0.8, **CALIBRATED},
    # all_layers: the tied 49152 x 576 embedding in 4-bit too (otherwise int8, a third of the int4 file): the
    # only openvino candidates under 15% of the base's size (77 MB) on the fine-tuned model, without a cut
    "int4-g32-all-awq-se": {"method": "openvino-int4", "group_size": 32, "all_layers": True, "awq": True,
                            "scale_estimation": True, **CALIBRATED},
    "int4-g32-all-gptq-se": {"method": "openvino-int4", "group_size": 32, "all_layers": True, "gptq": True,
                             "scale_estimation": True, **CALIBRATED},
    "int4-g64-all-awq-se": {"method": "openvino-int4", "group_size": 64, "all_layers": True, "awq": True,
                            "scale_estimation": True, **CALIBRATED},
    "int4-g32-all-lora": {"method": "openvino-int4", "group_size": 32, "all_layers": True, "lora_correction": True,
                          **CALIBRATED},
    "int4-g64-all-lora": {"method": "openvino-int4", "group_size": 64, "all_layers": True, "lora_correction": True,
                          **CALIBRATED},
    # GGUF: the file, as transformers reloads it
    **{f"gguf-{t}": {"method": f"gguf-{t}"} for t in ("f16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")},
    # Q8_0 with the output head (SmolLM2: the tied embedding) kept F16, as llama-quantize --output-tensor-type f16
    "gguf-q8_0-f16-head": {"method": "gguf-q8_0", "output_tensor_type": "f16"},
}
DEFAULT = ["bnb-int8", "bnb-nf4", "openvino-int8", "openvino-int4", "int4-g32", "int4-g32-awq", "int4-g32-se",
           "int4-g32-awq-se", "int4-g32-gptq", "int4-g32-lora", "int4-g32-awq-se-r80"]
PROMPTS = ["The Python interpreter reads a program and", "In the history of the English language,"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", type=Path, default=None,
                   help="fp32 model folder (default: the quick start's base/, made by the load stage)")
    p.add_argument("--candidates", nargs="+", default=DEFAULT, choices=list(PRESETS), metavar="NAME",
                   help=f"named candidates (default: %(default)s; all: {', '.join(PRESETS)})")
    p.add_argument("--also", type=Path, default=None,
                   help="a second model folder (e.g. fine-tuned with finetune.qat) quantized with the same candidates")
    p.add_argument("--stdlib-tokens", type=int, default=None, help="stdlib validation tokens (default: all)")
    p.add_argument("--wiki-tokens", type=int, default=32768, help="first N tokens of WikiText-2 test")
    p.add_argument("--wikitext", type=Path, default=common.WIKITEXT_TEST, help="WikiText-2 test.txt")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="speed rounds over all models (median per model)")
    p.add_argument("--threads", type=int, default=None, help="torch and OpenVINO threads (default: their own)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, seconds: checks the script runs")
    p.add_argument("--out", type=Path, default=None, help="result file (default bench/results/quantize.json)")
    return p.parse_args(argv)


def load(folder: Path, threads: int | None):
    from pipeline import formats

    if formats.openvino.holds(folder) and threads:
        from optimum.intel import OVModelForCausalLM

        return OVModelForCausalLM.from_pretrained(folder, ov_config={"INFERENCE_NUM_THREADS": str(threads)},
                                                  use_cache=formats.openvino.kv_cache(folder))
    return formats.load_folder(folder, device_map="cpu")[0]


def ppl(model, texts: dict, args) -> dict:
    from pipeline.metrics import perplexity

    return {name: perplexity(model, ids, args.context, args.stride, batch_size=args.batch_size)["perplexity"]
            for name, ids in texts.items()}


def speeds(folders: dict, tokenizer, args) -> dict:
    """Median prefill and generate tokens/s per model over `args.rounds` rounds that visit every model;
    a GGUF folder is timed twice when llama-cpp-python is installed: as transformers reloads it and in
    llama.cpp itself (`NAME@llama.cpp`), so all clients share the same rounds and machine load."""
    import statistics

    from pipeline import formats, llamacpp
    from pipeline.metrics import speed

    prefill = llamacpp.prefill_ids(tokenizer, PROMPTS, args.prefill_tokens)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    timers = {}
    for name, folder in folders.items():
        model = load(folder, args.threads)
        timers[name] = lambda m=model: speed(m, tokenizer, PROMPTS, args.prefill_tokens, args.new_tokens, 1)
        gguf = formats.gguf.file_of(folder)
        if gguf is not None and llamacpp.available():
            llm = llamacpp.load(gguf, max(args.context, len(prefill), max(map(len, prompts)) + args.new_tokens),
                                args.threads)
            timers[f"{name}@llama.cpp"] = lambda m=llm: llamacpp.speed(m, prefill, prompts, args.new_tokens)
    runs = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, timer in timers.items():
            runs[name].append(timer())
    out = {}
    for name, timed in runs.items():
        gen = [t["gen_tok_s"] for t in timed]
        out[name] = {"prefill_tok_s": round(statistics.median(t["prefill_tok_s"] for t in timed), 1),
                     "gen_tok_s": round(statistics.median(gen), 2), "gen_tok_s_rounds": gen}
    return out


def quantize_all(folder: Path, work: Path, names: list[str], tokenizer, texts: dict, args) -> tuple[dict, dict]:
    """fp32 row and every named candidate of one model folder (perplexity, size, convert time; speed later)."""
    import torch

    from pipeline import data, formats, llamacpp
    from pipeline import quant_backends as qb

    started = time.perf_counter()
    fp32 = {"input": str(folder), "disk_mb": formats.disk_mb(folder),
            "ppl": ppl(load(folder, args.threads), texts, args), "eval_seconds": round(time.perf_counter() - started, 1)}
    report(f"{work.name} fp32", fp32)
    # One calibration per model folder: its float export, collected inputs and nncf statistics are shared.
    calibration = qb.Calibration(
        work, lambda n, tokens: data.calibration_blocks(data.DataConfig(), tokenizer, 42, n, "bench calibration",
                                                        block_size=tokens), 128)
    rows, folders = {}, {"fp32": folder}
    for name in names:
        options = dict(PRESETS[name])
        if args.smoke and options["method"] == "openvino-int4":  # the tiny model is 64 wide
            options.update(group_size=32, **({"calibration_samples": 4} if "calibration_samples" in options else {}))
        cand = qb.Candidate(**options)
        out = work / name
        started = time.perf_counter()
        try:
            model = qb.quantize(cand, folder, torch.device("cpu"), calibration=calibration)
            qb.save(model, out, cand, tokenizer)
            del model
            row = {"description": qb.describe(cand), "convert_seconds": round(time.perf_counter() - started, 1),
                   "disk_mb": formats.disk_mb(out)}
            started = time.perf_counter()
            row["ppl"] = ppl(load(out, args.threads), texts, args)
            row["eval_seconds"] = round(time.perf_counter() - started, 1)
            if formats.gguf.file_of(out) is not None and llamacpp.available():  # the file in llama.cpp itself
                row["llamacpp"] = llamacpp_row(formats.gguf.file_of(out), texts, args)
            folders[name] = out
        except Exception as err:  # noqa: BLE001 -- one broken method must not lose the others' numbers
            row = {"error": f"{type(err).__name__}: {err}"[:400]}
        rows[name] = {"options": options, **row}
        report(f"{work.name} {name}", row)
    return {"fp32": fp32, "candidates": rows}, folders


def report(name, row):
    print(f"{name}: ppl {row.get('ppl')}, {row.get('disk_mb')} MB, prefill {row.get('prefill_tok_s')} tok/s, "
          f"generate {row.get('gen_tok_s')} tok/s", flush=True)


def finish(result: dict, timed: dict, prefix: str) -> None:
    """Speeds and the ratios to the same folder's fp32 row."""
    fp32 = result["fp32"]
    fp32.update(timed[f"{prefix}fp32"])
    for name, row in result["candidates"].items():
        if f"{prefix}{name}" not in timed:
            continue
        row.update(timed[f"{prefix}{name}"])
        row["ppl_increase_pct"] = {k: round(100 * (v / fp32["ppl"][k] - 1), 2) for k, v in row["ppl"].items()}
        row["size_ratio"] = round(row["disk_mb"] / fp32["disk_mb"], 3)
        row["speedup_vs_fp32"] = round(row["gen_tok_s"] / fp32["gen_tok_s"], 2)
        row["prefill_speedup_vs_fp32"] = round(row["prefill_tok_s"] / fp32["prefill_tok_s"], 2)
        if "llamacpp" in row:
            row["llamacpp"]["ppl_increase_pct"] = {k: round(100 * (v / fp32["ppl"][k] - 1), 2)
                                                   for k, v in row["llamacpp"]["ppl"].items()}
            row["llamacpp"].update(timed.get(f"{prefix}{name}@llama.cpp", {}))
        report(f"{prefix}{name}", row)


def llamacpp_row(path: Path, texts: dict, args) -> dict:
    """A GGUF file in llama.cpp itself (llama-cpp-python installed): perplexity on the same token ids and
    windows as every other row (its speed is timed with the others, in `speeds`)."""
    from pipeline import llamacpp

    llm = llamacpp.load(path, args.context, args.threads)
    return {"ppl": {name: llamacpp.perplexity(llm, ids, args.context, args.stride)["perplexity"]
                    for name, ids in texts.items()},
            "weight_repacking": not llamacpp.uses_amx()}


def llamacpp_targets(result: dict) -> dict | None:
    """The GGUF issue's targets, read off the rows: Q8_0 within +0.5% of fp32 on every text in llama.cpp,
    and llama.cpp's generation speed for Q8_0 and the best 4/5-bit type beside OpenVINO int8's."""
    rows = {name: row for name, row in result["candidates"].items() if "ppl_increase_pct" in row.get("llamacpp", {})}
    q8_rows = [name for name, row in rows.items() if row["options"]["method"] == "gguf-q8_0"]
    if not q8_rows:
        return None
    q8_name = min(q8_rows, key=lambda n: max(rows[n]["llamacpp"]["ppl_increase_pct"].values()))
    q8 = rows[q8_name]["llamacpp"]
    low_bit = {n: r for n, r in rows.items() if r["options"]["method"] in ("gguf-q4_0", "gguf-q4_1", "gguf-q5_0",
                                                                           "gguf-q5_1")}
    best = min(low_bit, key=lambda n: max(low_bit[n]["llamacpp"]["ppl_increase_pct"].values()), default=None)
    gen = {f"{q8_name}@llama.cpp": q8.get("gen_tok_s")}
    if best:
        gen[f"{best}@llama.cpp"] = low_bit[best]["llamacpp"].get("gen_tok_s")
    for name in ("openvino-int8", "fp32"):
        row = result["fp32"] if name == "fp32" else result["candidates"].get(name, {})
        if "gen_tok_s" in row:
            gen[name] = row["gen_tok_s"]
    return {"q8_0": q8_name, "q8_0_ppl_increase_pct": q8["ppl_increase_pct"],
            "q8_0_within_0.5pct": all(v <= 0.5 for v in q8["ppl_increase_pct"].values()),
            "best_4_5_bit": best, "best_4_5_bit_ppl_increase_pct": best and low_bit[best]["llamacpp"]["ppl_increase_pct"],
            "gen_tok_s": gen}


def scored_texts(folder: Path, args) -> tuple:
    """The tokenizer of `folder` and the token ids every model is scored on (--smoke: fewer, and smaller
    settings throughout)."""
    from pipeline import data, models

    if args.smoke:
        args.stdlib_tokens, args.wiki_tokens = 256, 256
        args.context, args.stride, args.prefill_tokens, args.new_tokens, args.rounds = 64, 32, 32, 4, 1
    tokenizer = models.load_tokenizer(models.Source("folder", str(folder)))
    stdlib = data.eval_stream(data.prepare(data.DataConfig(), tokenizer, 42)["validation"])
    texts = {"stdlib-validation": stdlib[: args.stdlib_tokens]}
    if args.wikitext.is_file():  # 4 characters per token at least: read enough text, then cut
        wiki = tokenizer(args.wikitext.read_text()[: args.wiki_tokens * 8], verbose=False)["input_ids"]
        texts["wikitext-2-test"] = wiki[: args.wiki_tokens]
    elif not args.smoke:
        raise SystemExit(f"{args.wikitext} does not exist; pass --wikitext path/to/wikitext-2/test.txt")
    return tokenizer, texts


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    load_before = os.getloadavg()  # other jobs on the machine slow every number down
    folder = args.input or (common.tiny_folder(work) if args.smoke else common.smollm2_folder())
    tokenizer, texts = scored_texts(folder, args)

    (work / "main").mkdir()
    main_result, folders = quantize_all(folder, work / "main", args.candidates, tokenizer, texts, args)
    also_result = None
    if args.also:
        (work / "also").mkdir()
        also_result, also_folders = quantize_all(args.also, work / "also", args.candidates, tokenizer, texts, args)
        folders.update({f"also/{k}": v for k, v in also_folders.items()})
    timed = speeds(folders, tokenizer, args)  # all models in the same rounds
    finish(main_result, timed, "")
    targets = llamacpp_targets(main_result)
    result = {
        "settings": {
            "model": "tiny-llama (smoke)" if args.smoke else f"SmolLM2-135M-Instruct: {folder}",
            "texts": {k: len(v) for k, v in texts.items()},
            "calibration": "seeded blocks of the stdlib training split (never the validation split)",
            "context": args.context, "stride": args.stride, "batch_size": args.batch_size,
            "prompts": PROMPTS, "prefill_tokens": args.prefill_tokens, "new_tokens": args.new_tokens,
            "decoding": "greedy", "speed_rounds": args.rounds, "threads": args.threads or torch.get_num_threads(),
            "device": "cpu",
            "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
            "note": "weight-only quantization; speeds measured on a CPU shared with other jobs are noisy",
        },
        **main_result,
        **({"llamacpp_targets": targets} if targets else {}),
    }
    if also_result:
        finish(also_result, timed, "also/")
        result["also"] = also_result
    common.save("quantize", result, args.out)
    return result


if __name__ == "__main__":
    main()
