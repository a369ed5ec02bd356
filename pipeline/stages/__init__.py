"""One module per stage; each has a config dataclass and `run(cfg, ctx) -> Path`."""

ORDER = ("load", "finetune", "prune", "distill", "quantize", "evaluate")
