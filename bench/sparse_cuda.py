"""Does 2:4 sparsity buy speed on a GPU? PyTorch's semi-structured sparse kernels against the dense model.

PyTorch runs a 2:4-sparse weight through cuSPARSELt / CUTLASS kernels (`torch.sparse.to_sparse_semi_structured`)
on CUDA GPUs of compute capability 8.0 or newer, in fp16 or bf16. This bench loads the dense fine-tuned model and
the healed 2:4 SparseGPT student of bench/sparsity.py in fp16, swaps every 2:4 block linear weight of the student
for its semi-structured form, checks the swapped model gives the same logits as its dense self, and times a
forward pass of a batch of 256-token sequences (prefill) and of one token per sequence over the same batch
(decode-like, no cache), dense student vs sparse student, median of `--repeats` with CUDA events. Where there is
no such GPU it records why and stops: elsewhere 2:4 sparsity saves disk, not time (docs/reference.md).

    python bench/sparse_cuda.py                       # the healed 2:4 student of bench/sparsity.py
    python bench/sparse_cuda.py --smoke --out /tmp/c.json   # tiny Llama made 2:4 by magnitude
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import common

ROOT = common.ROOT
STUDENT = ROOT / "runs" / "bench-sparsity" / "sparsity-2-4-sparsegpt" / "distill"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=STUDENT, help="a 2:4-sparse model folder")
    p.add_argument("--batch", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--tokens", type=int, default=256, help="tokens per sequence in the prefill pass")
    p.add_argument("--repeats", type=int, default=30, help="timed forward passes per shape (median reported)")
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama, made 2:4 by magnitude")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def unavailable() -> str | None:
    """Why the semi-structured kernels cannot run here (None: they can)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU: PyTorch's 2:4 kernels run on CUDA only"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"compute capability {major}.{minor}: PyTorch's 2:4 kernels need 8.0 or newer"
    return None


def sparsify(model) -> list[str]:
    """Swap the 2:4 weights of the block linears (nn.Linear, [out, in]) for their semi-structured form; the names
    swapped."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    from pipeline import sparsity

    swapped = []
    for name, (module, in_dim) in sparsity.block_linears(model).items():
        if in_dim == 1 and sparsity.fits_pattern(module.weight, (2, 4)):
            module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
            swapped.append(name)
    return swapped


def _time(model, ids, repeats: int) -> float:
    import torch

    times = []
    with torch.no_grad():
        for i in range(repeats + 3):  # three warm-up passes
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(ids, use_cache=False)
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def _smoke_model(tmp: Path) -> Path:
    from pipeline import formats, sparsity

    model, tok = formats.load_folder(common.tiny_folder(tmp))
    sparsity.apply(model, sparsity.masks(model, sparsity.SparsitySettings(pattern="2:4", method="magnitude")))
    model.save_pretrained(tmp / "two-four")
    tok.save_pretrained(tmp / "two-four")
    return tmp / "two-four"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from pipeline import formats

    if args.smoke:
        args.model, args.batch, args.tokens, args.repeats = "tiny Llama, 2:4 by magnitude", 2, 64, 3
    payload = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch": torch.__version__}
    why = unavailable()
    if why is not None:
        payload.update(skipped=why, note="2:4 sparsity saves disk, not time, on this machine")
        print(f"skipped: {why}")
        common.save("sparse-cuda", payload, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = _smoke_model(Path(tmp)) if args.smoke else args.model
        model, _ = formats.load_folder(folder, dtype=torch.float16)
        model = model.cuda().eval()
        vocab = model.config.vocab_size
        ids = {"prefill": torch.randint(1, vocab, (args.batch, args.tokens), device="cuda"),
               "decode_like": torch.randint(1, vocab, (args.batch, 1), device="cuda")}
        with torch.no_grad():
            dense_logits = model(ids["prefill"], use_cache=False).logits.float()
        dense = {k: _time(model, v, args.repeats) for k, v in ids.items()}
        swapped = sparsify(model)
        with torch.no_grad():
            diff = float((model(ids["prefill"], use_cache=False).logits.float() - dense_logits).abs().max())
        sparse = {k: _time(model, v, args.repeats) for k, v in ids.items()}
    payload.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                   model=str(args.model), linears_swapped=len(swapped), max_abs_logit_diff=round(diff, 5),
                   dense_ms=dense, sparse_ms=sparse,
                   speedup={k: round(dense[k] / sparse[k], 3) for k in dense},
                   note="one run, fp16, no KV cache; decode_like = one token per sequence")
    print(payload)
    common.save("sparse-cuda", payload, args.out)


if __name__ == "__main__":
    main()
