"""Perplexity evaluation speed: our batched evaluator vs the Hugging Face guide's unbatched loop,
on the same model, text, windows; alternated rounds; writes bench/results/evaluate.json."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="validation tokens scored")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of (ours, guide)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, seconds: checks the script runs")
    p.add_argument("--out", type=Path, default=None, help="result file (default bench/results/evaluate.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from pipeline import data, formats
    from pipeline.metrics import guide_perplexity, perplexity

    tmp = Path(tempfile.mkdtemp())
    folder = common.tiny_folder(tmp) if args.smoke else common.smollm2_folder()
    model, tokenizer = formats.load_folder(folder)
    model.eval()
    ids = data.eval_stream(data.prepare(data.DataConfig(), tokenizer, 42)["validation"])[: args.tokens]
    ours_s, guide_s = [], []
    with torch.no_grad():
        for _ in range(args.rounds):
            start = time.perf_counter()
            ours = perplexity(model, ids, args.context, args.stride, batch_size=args.batch_size)
            ours_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            guide_ppl, scored = guide_perplexity(model, ids, args.context, args.stride)
            guide_s.append(time.perf_counter() - start)
    ours_tok_s = len(ids) / statistics.median(ours_s)
    guide_tok_s = len(ids) / statistics.median(guide_s)
    result = {
        "settings": {"model": "tiny-llama (smoke)" if args.smoke else "SmolLM2-135M-Instruct (fp32)",
                     "tokens": len(ids), "context": args.context, "stride": args.stride,
                     "batch_size": args.batch_size, "rounds": args.rounds, "text": "stdlib validation split",
                     # ours: batched windows, LM head and log-softmax on the scored positions only
                     "ours": "batched, logits_to_keep"},
        "ours_tok_s": round(ours_tok_s, 1),
        "guide_tok_s": round(guide_tok_s, 1),
        "ratio": round(ours_tok_s / guide_tok_s, 3),
        "ours_ppl": ours["perplexity"],
        "guide_ppl": guide_ppl,
        "same_scored_tokens": ours["scored_tokens"] == scored,
    }
    common.save("evaluate", result, args.out)
    return result


if __name__ == "__main__":
    main()
