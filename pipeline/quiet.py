"""Known-harmless messages of the libraries under the pipeline, silenced at their source loggers so that a normal
run's log shows what matters: one table, each entry saying why it is harmless. A whole logger is raised to ERROR
only where everything it warns is such noise; otherwise one message is matched exactly (its logger and the start
of its text) and every other message of that logger passes. `install()` runs when the package is imported, before
the libraries are; tests/test_quiet.py fails when a filter drops anything else, or an entry stops matching."""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Noise:
    logger: str  # the logger the library writes it with, or `warnings` for a Python warning
    starts: str | None  # the start of the message; None = every warning of that logger (raised to ERROR)
    why: str  # why it is not the user's to act on
    category: type[Warning] = Warning  # `warnings`: the warning's class


NOISE = (
    Noise("bitsandbytes.backends.cpu.ops", None, "bitsandbytes tries to fetch an optional CPU kernel from the Hub on "
          "import and warns when it cannot (offline, every import); it falls back to its built-in kernel"),
    Noise("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/",
          "bitsandbytes asks the kernels package for its optional CPU kernel on import (kernels 0.19 installs with "
          "transformers 5.25); offline, kernels says it skips the publisher check of that community kernel, and "
          "bitsandbytes falls back to its built-in kernel as above"),
    Noise("bitsandbytes.autograd._functions", None, "LLM.int8 on CPU says 'inputs will be cast' on every forward call "
          "of every 8-bit layer (840 lines for one generate)"),
    Noise("torchao", None, "peft imports torchao (the [qat] extra) to check its version; on a CPU build of torch its "
          "CUDA-only kernels (mxfp8, cutlass) fail to load with a warning each; fake-quantized training needs neither"),
    Noise("torch.utils._pytree", None, "torchao registers its enums with torch.compile the way torch >= 2.13 "
          "deprecates (register_constant() on an Enum subclass): torchao's to change, no effect on a run"),
    Noise("transformers.modeling_utils", "`loss_type=None` was set in the config but it is unrecognized",
          "transformers 5 says it once per run of every model whose config names no loss, then uses the causal-LM "
          "loss, which is the right one for every model the pipeline trains"),
    Noise("transformers.configuration_utils", "`torch_dtype` is deprecated! Use `dtype` instead!",
          "optimum-intel 2.2.0's OpenVINO export still passes the old name; the pipeline passes `dtype`"),
    Noise("transformers.masking_utils", "`cache_position` is deprecated as an arg",
          "transformers 5.5's masks, called by optimum-intel 2.2.0's export with the old argument (gone from 5.6)"),
    Noise("transformers.utils.generic", "`past_key_values`/`cache_params` are deprecated. Use `cache` instead.",
          "transformers >= 5.24 renamed the models' cache; optimum-intel 2.2.0's OpenVINO models still build their "
          "outputs with the old name, which transformers maps to the new one (once per run, on the first generate)"),
    Noise("optimum.intel.openvino.modeling_base", "Could not infer whether the model was already converted or not",
          "offline (HF_HUB_OFFLINE=1) optimum-intel 2.2.0 looks a local folder up in the Hub cache by calling a "
          "string method on the path it was given, fails, says so, and keeps the `export` flag the pipeline passed"),
    Noise("warnings", "`is_gradient_checkpointing` is deprecated", "peft 0.21 reads the attribute whenever it wraps "
          "a model, and transformers 5.23 renamed it and warns on every read; the old name still answers",
          FutureWarning),
    Noise("warnings", "The following rank_pattern keys did not match any targeted module", "peft 0.21 maps a "
          "mixture-of-experts model's pre-transformers-5 expert names onto the fused 3-D experts and sets a double "
          "rank for the fused gate|up weight under a name its own parameter wrapping never matches; the pipeline "
          "sets no rank pattern, so every adapted weight keeps the recipe's rank", RuntimeWarning),
    Noise("warnings", "The following alpha_pattern keys did not match any targeted module", "the same for the "
          "alpha peft pairs with that rank: every adapter keeps the recipe's alpha / r", RuntimeWarning),
    Noise("warnings", "`torch.jit.trace", "OpenVINO's PyTorch frontend (under optimum-intel's export) traces the model "
          "with TorchScript, which torch 2.15 deprecates with a warning for torch.jit.trace and trace_method on every "
          "export; openvino's to change, the traced graph is the same", FutureWarning),
)


class _Drop(logging.Filter):
    def __init__(self, starts: list[str]):
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def install() -> None:
    """Raise the all-noise loggers to ERROR, put the message filters on theirs and the warning filters in place
    (idempotent: `warnings` keeps one copy of an identical filter)."""
    by_logger: dict[str, list[str]] = {}
    for n in NOISE:
        if n.logger == "warnings":
            warnings.filterwarnings("ignore", message=re.escape(n.starts), category=n.category)
        elif n.starts is None:
            logging.getLogger(n.logger).setLevel(logging.ERROR)
        else:
            by_logger.setdefault(n.logger, []).append(n.starts)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _Drop)]:
            logger.removeFilter(old)
        logger.addFilter(_Drop(starts))
