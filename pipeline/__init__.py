"""Turn a pretrained causal LM into a small, fast model: load → fine-tune → distill → quantize → evaluate."""

__version__ = "0.1.0"

from pipeline import quiet as _quiet

# known-harmless library warnings, silenced before the libraries are imported (pipeline/quiet.py says why)
_quiet.install()
