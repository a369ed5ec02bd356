"""Turn a pretrained causal LM into a small, fast model: load → fine-tune → distill → quantize → evaluate."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes tries to fetch an optional CPU kernel from the Hub on import and warns when it cannot;
# it falls back to its built-in kernel, so the warning is noise (and repeats on every import).
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# LLM.int8 on CPU logs this on every forward call of every 8-bit layer.
_logging.getLogger("bitsandbytes.autograd._functions").setLevel(_logging.ERROR)
# peft imports torchao (the [qat] extra) to check its version; on a CPU build of torch, torchao's CUDA-only
# kernels (mxfp8, cutlass) fail to load with a warning each, and registering its enums warns through
# torch's pytree logger. Fake-quantized training needs neither kernel.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
