from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def terminal_signals():
    """Tests run as from a terminal, where Ctrl-C interrupts: a shell's background job (`make test &`, nohup)
    starts with SIGINT ignored, which the pipeline rightly leaves ignored, and the interrupt tests would fail."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        yield
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        yield


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: tiny.save_tiny(root / f"tiny-{arch}", arch, tokenizer) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def trained_llama(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama trained (about 10 s) on the text the load stage checks a tiny recipe's model on: one that
    has learned that text, so the source gate passes it."""
    return tiny.save_trained(tmp_path_factory.mktemp("models") / "trained-llama", tokenizer)


# Small but real: enough steps at a high learning rate that a random tiny model's loss clearly drops.
TINY_SECTIONS = {
    "data": {"block_size": 64, "max_train_blocks": 96},
    "finetune": {"max_steps": 12, "batch_size": 8, "learning_rate": 2.0e-3, "logging_steps": 1},
    "distill": {"max_steps": 12, "batch_size": 8, "learning_rate": 2.0e-3, "logging_steps": 1},
    # (memory: a fresh process per model costs seconds; test_evaluate turns it on)
    "evaluate": {"context": 64, "stride": 32, "max_tokens": 1024, "repeats": 1, "new_tokens": 4,
                 "prefill_tokens": 32, "generation": {"max_new_tokens": 4}, "memory": False},
    "quantize": {"context": 64, "stride": 32, "max_tokens": 512, "speed_tokens": 4},  # a quick quality gate
    "general": {"tokens": 256},  # a few base-model paragraphs: enough to score, quick to write
}


@pytest.fixture
def make_recipe(tmp_path):
    """Write a recipe for a tiny model; `sections` are merged over TINY_SECTIONS."""

    def make(model: Path | str, name: str = "tiny", check_source: bool = False, **sections) -> Path:
        # check_source false by default: the tiny models are random, not trained, and the load stage's gate rightly
        # refuses a model that predicts text worse than lzma packs it (tests/test_source_check.py tests it, with True)
        body = {"model": str(model), "name": name, "output_dir": str(tmp_path / "runs"), "check_source": check_source}
        for key in set(TINY_SECTIONS) | set(sections):
            body[key] = {**TINY_SECTIONS.get(key, {}), **sections.get(key, {})}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(body))
        return path

    return make
