"""How much of a fine-tune each GGUF type keeps, when the base model's weights came from a GGUF file.

The offline SmolLM2 is `SmolLM2-135M-Instruct.Q4_1.gguf`: its weights sit on a Q4_1 grid. Fine-tuning moves
them by a small fraction of a grid step, so re-quantizing to a grid that shares Q4_1's blocks (Q4_1 itself,
and partly Q5_1, which also spans each block's [min, max]) rounds most weights back to where they started.
For every layer matrix this script measures, with `gguf`'s own quantize/dequantize:
  error: ||Q(ft) - ft|| / ||ft||                      (the rounding noise of the type)
  kept:  <Q(ft) - base, ft - base> / ||ft - base||^2  (share of the fine-tune's change that survives)
summed over the matrices the export writes in that type; writes bench/results/gguf-grid.json.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common

TYPES = ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=None, help="base model folder (default: the quick start's base/)")
    p.add_argument("--finetuned", default=None, help="its fine-tuned folder (default: the quick start's finetune/)")
    p.add_argument("--types", default=",".join(TYPES), help=f"comma-separated subset of {', '.join(TYPES)}")
    p.add_argument("--out", default=str(common.RESULTS / "gguf-grid.json"))
    p.add_argument("--smoke", action="store_true", help="tiny Llama on a Q4_1 grid and a nudged copy, seconds")
    return p.parse_args(argv)


def layer_matrices(folder: Path) -> dict:
    """The 2-D weights the GGUF export writes in the file's type (the embedding and head stay Q8_0 or F16)."""
    from safetensors.numpy import load_file

    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(f))
    return {k: v.astype("float32") for k, v in weights.items()
            if v.ndim == 2 and "embed" not in k and "lm_head" not in k and "wte" not in k and "wpe" not in k}


def roundtrip(w, qtype: str):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    t = Q[qtype.upper()]
    return dequantize(quantize(w, t), t)


def source_types(folder: Path) -> dict | None:
    """Tensor types of the GGUF file the folder's lineage was loaded from, if it was one."""
    import collections

    import gguf

    from pipeline.records import origin

    parent = origin(folder) or ""
    if not parent.endswith(".gguf") or not Path(parent).is_file():
        return None
    reader = gguf.GGUFReader(parent)
    return {"file": Path(parent).name, "types": dict(collections.Counter(t.tensor_type.name for t in reader.tensors))}


def smoke_folders(tmp: Path) -> tuple[Path, Path]:
    """A tiny Llama whose layer weights are put on a Q4_1 grid (as a Q4_1 GGUF's are), and a copy nudged
    by 1% of their spread (a small fraction of a grid step), standing in for base and fine-tuned."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    base = common.tiny_folder(tmp)
    weights = load_file(base / "model.safetensors")
    rng = np.random.default_rng(0)
    nudged = {}
    for k, v in weights.items():
        if v.ndim == 2 and "embed" not in k and v.shape[-1] % 32 == 0:
            v = roundtrip(v.astype("float32"), "q4_1")
            weights[k] = v
        nudged[k] = v + (0.01 * v.std() * rng.standard_normal(v.shape).astype(v.dtype) if v.ndim == 2 else 0)
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    tuned = tmp / "tuned"
    tuned.mkdir()
    save_file(nudged, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    return base, tuned


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np

    if args.smoke:
        base_dir, tuned_dir = smoke_folders(Path(tempfile.mkdtemp()))
    else:
        base_dir = Path(args.base) if args.base else common.smollm2_folder()
        tuned_dir = Path(args.finetuned) if args.finetuned else common.ROOT / "runs" / "quickstart" / "finetune"
        if not (tuned_dir / "model.safetensors").is_file():
            raise SystemExit(f"{tuned_dir}: no fine-tuned model; run `make finetune` or pass --finetuned")
    base, tuned = layer_matrices(base_dir), layer_matrices(tuned_dir)
    names = [k for k in tuned if k in base and base[k].shape == tuned[k].shape and tuned[k].shape[-1] % 32 == 0]
    if not names:
        raise SystemExit(f"{base_dir} and {tuned_dir} share no layer matrices of the same shape")
    move = sum(float(np.sum((tuned[k] - base[k]) ** 2)) for k in names)
    norm = sum(float(np.sum(base[k] ** 2)) for k in names)
    types = {}
    for qtype in args.types.split(","):
        err = kept = 0.0
        for k in names:
            q = roundtrip(tuned[k], qtype)
            err += float(np.sum((q - tuned[k]) ** 2))
            kept += float(np.sum((q - base[k]) * (tuned[k] - base[k])))
        types[qtype] = {"error": round((err / norm) ** 0.5, 5), "kept": round(kept / move, 3)}
        print(qtype, types[qtype], flush=True)
    result = {"settings": {"base": str(base_dir), "finetuned": str(tuned_dir), "matrices": len(names),
                           "source": source_types(base_dir), "smoke": args.smoke},
              "finetune_change": round((move / norm) ** 0.5, 5), "types": types}
    common.save("gguf-grid", result, Path(args.out))
    return result


if __name__ == "__main__":
    main()
