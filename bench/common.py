"""Shared bits of the bench scripts: machine description, result files, the models and texts they use."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WIKITEXT_TEST = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/tiny.py builds the tiny models of --smoke runs


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine when the result was saved
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "date": time.strftime("%Y-%m-%d"),
    }


def save(name: str, payload: dict, out: Path | None = None) -> Path:
    out = out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **payload}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return out


def save_figure(fig, axes, legend_title: str, title: str, path: Path, handles: list | None = None) -> None:
    """One legend entry per label on the first panel (or the `handles` given, for plots whose points vary in
    more than one way), the title, then the file (the benches' two-panel plots)."""
    import matplotlib.pyplot as plt

    by_label = {h.get_label(): h for h in (handles or axes[0].collections)}
    axes[0].legend(by_label.values(), by_label.keys(), fontsize=8, title=legend_title, title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def run_child(cmd: list[str], what: str) -> tuple[str, dict]:
    """Run `cmd` in the repository root; its stdout, wall seconds and the child's own peak RSS (wait4).
    Output goes to files, not pipes: progress bars can fill a pipe and stall a child nobody reads."""
    import subprocess
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{what} failed:\n{stderr[-3000:]}")
    return stdout, {"wall_seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": usage.ru_maxrss / 1024}


def smollm2_folder() -> Path:
    """SmolLM2-135M as a safetensors folder (the quick start's base/, made once by the load stage)."""
    from pipeline import recipe, runner

    r = recipe.load(ROOT / "recipes" / "quickstart.yaml", [f"output_dir={ROOT / 'runs'}"])
    return runner.run(r, ["load"])["load"]


def tiny_folder(tmp: Path, arch: str = "llama") -> Path:
    import tiny

    return tiny.save_tiny(tmp / f"tiny-{arch}", arch, tiny.build_tokenizer())


def variant_args(p, argv, variants) -> object:
    """Parse the arguments of a bench that runs named variants of the quick start: unknown `--variants` are an
    argparse error, and `--smoke` shrinks the scored texts and windows to a quick check."""
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(variants)
    if unknown:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(variants)}")
    if args.smoke:
        args.max_tokens, args.wiki_tokens, args.context, args.stride = 256, 256, 32, 16
    return args
