"""Command line: `python -m pipeline run RECIPE.yaml [section.key=value ...] [--stages a,b] [--force]`,
`python -m pipeline push RECIPE.yaml [section.key=value ...] [--stages a,b] [--dry-run]`,
`python -m pipeline keys [SECTION] [--write]`."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback

from pipeline import interrupts
from pipeline.config import RecipeError
from pipeline.models import ModelSourceError
from pipeline.stages import ORDER

EXIT_USAGE = 2  # a problem the user can fix: bad recipe, data, model folder, full disk, busy run folder
EXIT_BUG = 1
EXIT_INTERRUPT = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERM = 143  # SIGTERM (128 + 15)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [pipeline] %(message)s", datefmt="%H:%M:%S")
    # INFO even when the host app configured logging first; in a multi-process run only rank 0 reports.
    from pipeline import dist

    logging.getLogger("pipeline").setLevel(logging.INFO if dist.is_main() else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers/datasets keep their progress bars; their info chatter is noise in a pipeline log.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Hub request when pushing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common],
                         help=f"run a recipe's stages: {', '.join(ORDER)}")
    run.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. finetune.max_steps=10")
    run.add_argument("--stages", help="comma-separated subset of stages to run (e.g. quantize,evaluate)")
    run.add_argument("--until", help="run the enabled stages up to and including this one (e.g. distill)")
    run.add_argument("--force", action="store_true", help="re-run stages even when their output is up to date")
    run.add_argument("--wait", action="store_true", help="if another run is using the run folder, wait for it "
                     "instead of stopping")
    gen = sub.add_parser("generate", parents=[common], help="generate text from a model folder (any stage output)")
    gen.add_argument("model", help="model folder, e.g. runs/quickstart/finetune")
    gen.add_argument("prompt", nargs="+", help="one or more prompts")
    # no defaults here: options left out take pipeline.generate.GenerationConfig's (greedy, 40 new tokens, ...)
    gen.add_argument("--strategy", choices=["greedy", "beam", "sample"], help="decoding (default greedy)")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--num-beams", type=int, help="beam search width")
    gen.add_argument("--temperature", type=float, help="sampling temperature")
    gen.add_argument("--top-k", type=int, help="sampling: keep the k most likely tokens (0 = off)")
    gen.add_argument("--top-p", type=float, help="sampling: nucleus probability mass")
    gen.add_argument("--seed", type=int, help="sampling seed")
    gen.add_argument("--chat", action="store_true",
                     help="each prompt is a user message: apply the tokenizer's chat template, print the answer")
    check = sub.add_parser("validate", parents=[common], help="validate a recipe without loading any model")
    check.add_argument("recipe")
    check.add_argument("overrides", nargs="*")
    push = sub.add_parser("push", parents=[common], help="upload stage folders to the Hugging Face Hub, one repo per stage")
    push.add_argument("recipe")
    push.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. push.private=false")
    push.add_argument("--stages", help="comma-separated stage folders to push (default: push.stages)")
    push.add_argument("--dry-run", action="store_true", help="print repos, files, sizes and cards; send nothing")
    keys = sub.add_parser("keys", parents=[common], help="print the recipe keys of a section (or of all) with their "
                          "defaults and meanings, as Markdown")
    keys.add_argument("section", nargs="?", help="e.g. quantize, finetune.qat or top (default: every section)")
    keys.add_argument("--write", action="store_true", help="rewrite the generated key tables in docs/reference.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come after options too (`run r.yaml --force a=b`), which plain argparse rejects
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("run", "validate", "push") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    if getattr(args, "stages", None) is not None:  # run and push: one list, checked once
        args.stages = [s.strip() for s in args.stages.split(",")]
        if not all(args.stages):  # `--stages ""` (an empty shell variable) would otherwise mean every stage
            parser.error(f"--stages {','.join(args.stages)!r} has an empty stage name; give comma-separated names, "
                         "e.g. --stages quantize,evaluate")
    if getattr(args, "until", None) is not None:  # stripped as the --stages names are
        if not args.until.strip():
            parser.error(f"--until {args.until!r} names no stage; give one, e.g. --until distill")
        args.until = args.until.strip()
    if args.command == "generate":
        return _generate(args)
    if args.command == "keys":
        return _keys(args)
    from pipeline import recipe as recipes

    try:
        recipe = recipes.load(args.recipe, args.overrides)
    except RecipeError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 -- checking a recipe against a model config can fail in a library too
        return report(err, args.debug)
    if args.command == "validate":
        print(f"{args.recipe}: OK (run folder {recipe.run_dir})")
        return 0
    _setup_logging()
    if args.command == "push":
        return _push(recipe, args)
    from pipeline import runner

    stages = args.stages
    with interrupts.interruptible():
        try:
            runner.run(recipe, stages, force=args.force, until=args.until, wait=args.wait)
            signum = interrupts.pending()
        except KeyboardInterrupt as err:  # a signal, or a KeyboardInterrupt raised without one
            interrupts.delivered()
            signum = interrupts.pending() or (signal.SIGTERM if isinstance(err, interrupts.Terminated) else signal.SIGINT)
        except Exception as err:  # noqa: BLE001 -- every failure ends in one message, not a traceback
            if interrupts.pending() is None:  # else a library turned the interrupt into its own error
                return report(err, args.debug)
            interrupts.delivered()
            signum = interrupts.pending()
    if signum is None:
        return 0
    print(f"{'terminated' if signum == signal.SIGTERM else 'interrupted'}: finished stages are kept; the "
          "unfinished one left no folder behind; run the same command again to continue", file=sys.stderr)
    return EXIT_TERM if signum == signal.SIGTERM else EXIT_INTERRUPT


def report(err: BaseException, debug: bool = False) -> int:
    """Print one clear line for `err` (the traceback too with --debug); return the exit code."""
    from pipeline import errors

    if debug:
        traceback.print_exception(err)
    clear = err if isinstance(err, ModelSourceError) else errors.explain(err)
    if clear is not None:
        print(f"error: {clear}", file=sys.stderr)
        return getattr(clear, "exit_code", EXIT_USAGE)  # a failed push_to_hub may be worth just re-running
    print(f"error: unexpected {type(err).__name__}: {' '.join(str(err).split())[:500]}\nThis looks like a bug in "
          "llm-pipeline; run the same command with --debug for the traceback and report it.", file=sys.stderr)
    return EXIT_BUG


def _generate(args) -> int:
    from pipeline.config import parse
    from pipeline.formats import load_folder
    from pipeline.generate import GenerationConfig, generate
    from pipeline.models import pick_device

    errors: list[str] = []
    settings = {k: getattr(args, k) for k in ("strategy", "max_new_tokens", "num_beams", "temperature", "top_k",
                                               "top_p", "seed") if getattr(args, k) is not None}
    cfg = parse(GenerationConfig, settings, "generate", errors)
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        return EXIT_USAGE
    try:
        model, tokenizer = load_folder(args.model, device_map=str(pick_device()))
    except Exception as err:  # noqa: BLE001
        return report(err, args.debug)
    for prompt in args.prompt:
        try:
            if args.chat:
                print(generate(model, tokenizer, prompt, cfg, chat=True).strip())
            else:
                print(prompt + generate(model, tokenizer, prompt, cfg))
        except ValueError as err:  # no chat template; an empty prompt and no BOS token
            print(f"error: {'--chat: ' if args.chat else ''}{err}", file=sys.stderr)
            return EXIT_USAGE
    return 0


def _keys(args) -> int:
    from pipeline import keys

    names = keys.select(args.section)
    if not names:
        print(f"error: keys: no section '{args.section}'; use one of: {', '.join(keys.sections())}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if not args.write:
            print(keys.markdown(args.section))
            return 0
        changed = keys.write(names=names + ([*keys.EXTRA] if args.section is None else []))
    except (OSError, ValueError) as err:  # no docs/reference.md or no block for a table; an undescribed key
        print(f"error: keys: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{keys.DOC}: {'rewrote ' + ', '.join(changed) if changed else 'key tables up to date'}")
    return 0


def _push(recipe, args) -> int:
    from pipeline import push

    stages = args.stages
    try:
        if args.dry_run:
            print(push.dry_run(recipe, stages))
            return 0
        done = push.push(recipe, stages)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to finish; files already on the Hub are not sent again",
              file=sys.stderr)
        return EXIT_INTERRUPT
    except Exception as err:  # noqa: BLE001
        return report(err, args.debug)
    for up in done:
        print(f"pushed {up.stage} → {up.repo_id}")
    return 0
