"""Peak memory of one model folder, measured in a process of its own.

Measured inside the evaluating process, a model's memory depends on what ran before it: pages freed by the
previous model (and by the reference log-probabilities) are reused without raising the process's RSS, so the
quick start once reported 16 MB for a 513 MB model. A fresh process per model gives the same number whatever
the order: the rise over its RSS (CUDA: the allocator's peak) once the libraries of the folder's format and
model class are imported, while it loads the folder and runs the speed measurement's workload once (its
prefill, and its greedy generation after the first prompt). `python -m pipeline.memprobe FOLDER ...` is that
process; `measure` runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

TIMEOUT_S = 1800  # a load that takes longer than this has something wrong with it; the column then says why


def measure(folder: Path, device: str, prompts: list[str], prefill_tokens: int, new_tokens: int) -> dict:
    """{"peak_mem_mb": MB} from a fresh process, or {"peak_mem_error": why} if that process failed (the
    report then shows no number for the model)."""
    root = str(Path(__file__).resolve().parents[1])  # the child imports this same `pipeline`, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pipeline.memprobe", str(folder), "--device", device, "--prompts",
           json.dumps(prompts), "--prefill-tokens", str(prefill_tokens), "--new-tokens", str(new_tokens)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"peak_mem_error": f"the measuring process ran past {TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:  # the measure is the child's last line; a library printing after it leaves none to read
            return json.loads(lines[-1])
        except ValueError:
            return {"peak_mem_error": f"the measuring process ended without its result (last line: {lines[-1]!r})"}
    why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"peak_mem_error": why}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.memprobe", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", default='["The"]', help="JSON list of prompts")
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import torch

    from pipeline import formats, quiet
    from pipeline.metrics import PeakMemory, greedy, model_device, prefill_ids

    quiet.install()
    fmt = formats.of_folder(args.folder)
    if fmt is None:
        parser.error(f"'{args.folder}' is not a model folder")
    # library code, the same for every model of its format and class, is not the model's memory (transformers
    # imports a model class's modules on first use: about 145 MB)
    for name in fmt.RUNTIME:
        importlib.import_module(name)
    config = Path(args.folder) / "config.json"
    if config.is_file():
        import transformers

        for architecture in json.loads(config.read_text()).get("architectures") or []:
            getattr(transformers, architecture, None)
    device = torch.device(args.device)
    prompts = json.loads(args.prompts)
    # both kinds of memory: a folder may run on the CPU whatever device it is given (OpenVINO)
    cpu = PeakMemory(torch.device("cpu"))
    gpu = PeakMemory(device) if device.type == "cuda" else contextlib.nullcontext()
    with cpu, gpu, torch.no_grad():
        model, tokenizer = formats.load_folder(args.folder, device_map=str(device))
        runs_on = model_device(model)
        ids = prefill_ids(tokenizer, prompts, args.prefill_tokens, runs_on)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        greedy(model, tokenizer, tokenizer(prompts[0], return_tensors="pt").to(runs_on), args.new_tokens)
    peak = gpu.peak_mb if runs_on.type == "cuda" else cpu.peak_mb
    print(json.dumps({"peak_mem_mb": round(peak, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
