"""Command line: `python -m pipeline run RECIPE.yaml [section.key=value ...] [--stages a,b] [--force]`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.config import RecipeError, StageError
from pipeline.models import ModelSourceError

EXIT_USAGE = 2


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [pipeline] %(message)s", datefmt="%H:%M:%S")
    # INFO even when the host app configured logging first; in a multi-process run only rank 0 reports.
    from pipeline import dist

    logging.getLogger("pipeline").setLevel(logging.INFO if dist.is_main() else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers/datasets keep their progress bars; their info chatter is noise in a pipeline log.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe's stages: load, finetune, distill, quantize, evaluate")
    run.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. finetune.max_steps=10")
    run.add_argument("--stages", help="comma-separated subset of stages to run (e.g. quantize,evaluate)")
    run.add_argument("--until", help="run the enabled stages up to and including this one (e.g. distill)")
    run.add_argument("--force", action="store_true", help="re-run stages even when their output is up to date")
    check = sub.add_parser("validate", help="validate a recipe without loading any model")
    check.add_argument("recipe")
    check.add_argument("overrides", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline import recipe as recipes

    try:
        recipe = recipes.load(args.recipe, args.overrides)
    except RecipeError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_USAGE
    if args.command == "validate":
        print(f"{args.recipe}: OK (run folder {recipe.run_dir})")
        return 0
    _setup_logging()
    from pipeline import runner

    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    try:
        runner.run(recipe, stages, force=args.force, until=args.until)
    except (StageError, ModelSourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; the unfinished one left no folder behind", file=sys.stderr)
        return 130
    return 0
