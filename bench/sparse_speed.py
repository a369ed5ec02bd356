"""Does weight sparsity buy speed anywhere on a CPU? OpenVINO W8A8 with the CPU plugin's sparse weight decompression.

The one CPU path that skips zeros: OpenVINO's CPU plugin packs the non-zero int8 weights of a FullyConnected
(int8 weights *and* activations, i.e. W8A8) at compile time when `CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE` is below
1 (the default, off) and the weight has at least that share of zeros; it is implemented for CPUs with AMX. This
bench exports the dense fine-tuned model and the sparse healed students of bench/sparsity.py to OpenVINO without
a KV cache, quantizes each to W8A8 with NNCF (calibration: blocks of the quick start's training split; weights
symmetric per channel, so a zero stays a zero), and times a forward pass of 8 tokens (memory-bound, decode-like)
and of 256 tokens (prefill), each compiled for its static shape, with the property off and at 0.5, on the same
machine in one run, and records which FullyConnected kernels the plugin chose (`..._amx_sparse_...` where it
packed the weights). Perplexity of each
W8A8 model on the validation split says what the int8 activations cost.

    python bench/sparse_speed.py            # dense + the healed 50% / 2:4 SparseGPT students (~10 min, 2 cores)
    python bench/sparse_speed.py --smoke --out /tmp/s.json   # tiny Llama, half a minute
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common

ROOT = common.ROOT
SPARSE = ROOT / "runs" / "bench-sparsity"
MODELS = {"dense fine-tuned": ROOT / "runs" / "quickstart" / "finetune",
          "50% unstructured (SparseGPT, healed)": SPARSE / "sparsity-unstructured-50-sparsegpt" / "distill",
          "2:4 (SparseGPT, healed)": SPARSE / "sparsity-2-4-sparsegpt" / "distill"}
RATES = {"off": 1.0, "0.5": 0.5}  # the property's value; 1 = never pack


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calibration-blocks", type=int, default=32)
    p.add_argument("--block", type=int, default=128, help="tokens per calibration block")
    p.add_argument("--eval-tokens", type=int, default=4096, help="validation tokens scored (256-token windows)")
    p.add_argument("--repeats", type=int, default=30, help="timed forward passes per shape (median reported)")
    p.add_argument("--threads", type=int, default=None, help="OpenVINO inference threads (default: all cores)")
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama, made sparse by magnitude")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _texts(tokenizer, args) -> tuple[list, list]:
    """Calibration blocks of the training split and scoring windows of the validation split (quick start data)."""
    from pipeline import data

    splits = data.load_splits(data.DataConfig(), 42)
    ids = {k: tokenizer("\n\n".join(splits[k]["text"]))["input_ids"] for k in ("train", "validation")}
    calib = [ids["train"][i * args.block:(i + 1) * args.block] for i in range(args.calibration_blocks)]
    n = min(args.eval_tokens, len(ids["validation"])) // 256
    return calib, [ids["validation"][i * 256:(i + 1) * 256] for i in range(n)]


def _inputs(model, ids: list[int]) -> dict:
    import numpy as np

    names = {i.get_any_name() for i in model.inputs}
    arr = np.array([ids], dtype=np.int64)
    feed = {"input_ids": arr, "attention_mask": np.ones_like(arr)}
    if "position_ids" in names:
        feed["position_ids"] = np.arange(arr.shape[1], dtype=np.int64)[None]
    return {k: v for k, v in feed.items() if k in names}


def _zeros(model) -> float:
    """Share of zeros in the float 2-D weights (Constants) of the blocks: not the embedding / LM head."""
    zero = total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) == 2:
            shape = list(op.get_output_shape(0))
            if max(shape) >= 20000:  # the embedding / LM head: dense in every variant
                continue
            w = op.get_data()
            if w.dtype.kind == "f":
                zero, total = zero + int((w == 0).sum()), total + w.size
    return zero / total if total else 0.0


def _export(folder: Path):
    from optimum.intel import OVModelForCausalLM

    ov = OVModelForCausalLM.from_pretrained(folder, export=True, use_cache=False, compile=False)
    return ov.model


def _w8a8(model, calib):
    import nncf

    return nncf.quantize(model, nncf.Dataset([_inputs(model, ids) for ids in calib]),
                         model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))


def _time(core, model, rate: float, shapes: dict, args) -> dict:
    """Median latency of each shape, compiled for that static shape (with dynamic shapes the plugin picks its
    kernels at run time and, measured here, never the sparse one), and which FullyConnected kernels it chose."""
    import numpy as np
    import openvino as ov

    config = {"CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE": rate, "PERFORMANCE_HINT": "LATENCY"}
    if args.threads:
        config["INFERENCE_NUM_THREADS"] = args.threads
    out = {}
    for name, ids in shapes.items():
        model.reshape({i.get_any_name(): ov.PartialShape([1, len(ids)]) for i in model.inputs})
        start = time.perf_counter()
        compiled = core.compile_model(model, "CPU", config)
        out[f"{name}_compile_seconds"] = round(time.perf_counter() - start, 2)
        request = compiled.create_infer_request()
        feed = _inputs(model, ids)
        for _ in range(3):
            request.infer(feed)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            request.infer(feed)
            times.append(time.perf_counter() - t)
        out[f"{name}_ms"] = round(statistics.median(times) * 1000, 2)
        out[f"{name}_tok_s"] = round(len(ids) / statistics.median(times), 1)
        kernels = [op.get_rt_info()["primitiveType"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
                   if "layerType" in op.get_rt_info() and op.get_rt_info()["layerType"].astype(str) == "FullyConnected"]
        out[f"{name}_fc_kernels"] = {k: kernels.count(k) for k in sorted(set(kernels))}
        if name == "prefill_256":
            out["logits"] = np.asarray(request.infer(feed)[0])  # for the agreement check
    model.reshape({i.get_any_name(): ov.PartialShape([1, -1]) for i in model.inputs})
    return out


def _ppl(core, model, windows) -> float:
    import math

    import numpy as np

    request = core.compile_model(model, "CPU").create_infer_request()
    nll = n = 0.0
    for ids in windows:
        logits = np.asarray(request.infer(_inputs(model, ids))[0])[0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        n += len(ids) - 1
    return math.exp(nll / n)


def _smoke_models(tmp: Path) -> dict:
    import torch

    from pipeline import formats

    dense = common.tiny_folder(tmp)
    model, tok = formats.load_folder(dense)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.mul_((p.abs() >= p.abs().flatten().median()).to(p.dtype))
    sparse = tmp / "sparse"
    model.save_pretrained(sparse)
    tok.save_pretrained(sparse)
    return {"dense": dense, "50% magnitude": sparse}


def main(argv=None) -> None:
    args = parse_args(argv)
    import openvino as ov

    from pipeline import models

    core = ov.Core()
    amx = "AMX" in " ".join(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")) or \
        "amx_tile" in Path("/proc/cpuinfo").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        chosen = _smoke_models(Path(tmp)) if args.smoke else {k: v for k, v in MODELS.items() if v.is_dir()}
        if args.smoke:
            args.calibration_blocks, args.block, args.eval_tokens, args.repeats = 4, 32, 512, 3
        tokenizer = models.load_tokenizer(models.Source("folder", str(next(iter(chosen.values())))))
        calib, windows = _texts(tokenizer, args)
        shapes = {"decode_like_8": windows[0][:8], "prefill_256": windows[0][:256]}
        rows, reference = {}, None
        for name, folder in chosen.items():
            print(f"{name}: export, W8A8, time", flush=True)
            fp = _export(folder)
            zeros = _zeros(fp)
            start = time.perf_counter()
            q = _w8a8(fp, calib)
            row = {"folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else folder.name,
                   "block_weight_zeros": round(zeros, 4), "quantize_seconds": round(time.perf_counter() - start, 1),
                   "validation_ppl_w8a8": round(_ppl(core, q, windows), 3),
                   "validation_ppl_fp32": round(_ppl(core, fp, windows), 3)}
            for label, rate in RATES.items():
                timed = _time(core, q, rate, shapes, args)
                logits = timed.pop("logits")
                if label == "off":
                    reference = logits
                else:  # the packed weights must compute the same thing
                    timed["max_abs_logit_diff_vs_off"] = float(abs(logits - reference).max())
                row[f"rate_{label}"] = timed
            kernels = row["rate_0.5"]["prefill_256_fc_kernels"]
            row["sparse_fc_at_0.5"] = f"{sum(n for k, n in kernels.items() if 'sparse' in k)} of {sum(kernels.values())}"
            row["speedup_decode_like"] = round(row["rate_off"]["decode_like_8_ms"] / row["rate_0.5"]["decode_like_8_ms"], 3)
            row["speedup_prefill"] = round(row["rate_off"]["prefill_256_ms"] / row["rate_0.5"]["prefill_256_ms"], 3)
            rows[name] = row
            print(row, flush=True)
    payload = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "amx": amx, "openvino": ov.__version__, "nncf": common._version("nncf"), "models": rows,
               "note": "one run; the machine's other load is in machine.load_avg_1m"}
    common.save("sparse-speed", payload, args.out)


if __name__ == "__main__":
    main()
