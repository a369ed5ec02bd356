"""Publish stage folders to the Hugging Face Hub: one repo per stage, cards that show the lineage.

`python -m pipeline push RECIPE [--stages ...] [--dry-run]`, or `push.push_to_hub: true` in a recipe to
push each stage as it finishes. Everything goes through `huggingface_hub` (`create_repo`,
`upload_folder`), so HF_ENDPOINT, HF_TOKEN and `hf auth login` work as usual. The token is handed to
the library only: never printed, logged or written.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.cards import model_card
from pipeline.errors import StageError
from pipeline.recipe import Recipe
from pipeline.records import StageRecord, read_record
from pipeline.stages import BY_FOLDER, BY_NAME, MODEL_FOLDERS, enabled

log = logging.getLogger("pipeline")
EXIT_SETUP, EXIT_RETRY = 2, 1  # fix the token/recipe first | network or server trouble: run it again


class PushError(StageError):
    """Publishing failed; `exit_code` says whether to fix something (2) or just run it again (1)."""

    def __init__(self, message: str, exit_code: int = EXIT_SETUP):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Upload:
    """One stage folder, planned for one repo."""

    stage: str
    folder: Path
    repo_id: str
    base_model: str | None
    card: str  # README.md as it will be on the Hub
    files: list[tuple[str, int]]  # (path in repo, bytes), README.md included
    record: StageRecord
    parent: str | None  # the stage of this run it was made from

    @property
    def size(self) -> int:
        return sum(n for _, n in self.files)


def choose(recipe: Recipe, stages: list[str] | None) -> list[str]:
    """Stage folders to push, in pipeline order: the ones asked for, or the recipe's enabled `push.stages`."""
    if stages:
        asked = [BY_NAME[s].folder if s in BY_NAME and BY_NAME[s].folder else s for s in stages]
        unknown = [s for s in asked if s not in MODEL_FOLDERS]
        if unknown:
            raise PushError(f"push: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(MODEL_FOLDERS)}")
    else:
        asked = [s for s in recipe.push.stages or MODEL_FOLDERS if enabled(BY_FOLDER[s], recipe)]
    return [s for s in MODEL_FOLDERS if s in asked]


def repo_id(recipe: Recipe, stage: str, user: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = recipe.push.repo.format(user=user, recipe=recipe.name, stage=stage)
    if "/" not in repo:  # no namespace: the Hub puts it under the token's user
        repo = f"{user}/{repo}"
    try:
        validate_repo_id(repo.replace("<user>", "user"))  # the dry-run placeholder is not a name problem
    except HFValidationError as err:
        raise PushError(f"push.repo: '{repo}' (from '{recipe.push.repo}') is not a valid repo id: {err}") from err
    return repo


def parent_stage(record: StageRecord, run_dir: Path) -> str | None:
    """The stage folder of this run that `record`'s stage was made from, if any."""
    parent = Path(record.parent)
    return next((s for s in MODEL_FOLDERS if parent.parts[-2:] == (run_dir.name, s)), None)


def require_finished(recipe: Recipe, stages: list[str]) -> None:
    missing = [s for s in stages if read_record(recipe.run_dir / s) is None]
    if missing:
        raise PushError(f"push: no finished {', '.join(missing)} folder in {recipe.run_dir}; run the recipe first "
                        f"(python -m pipeline run <recipe>) or choose other stages with --stages")


def plan(recipe: Recipe, stages: list[str], user: str, on_hub: Callable[[str], bool]) -> list[Upload]:
    """Repo, card and file list of every chosen stage; fails before any upload if a folder is not finished."""
    require_finished(recipe, stages)
    uploads = []
    for stage in stages:
        folder = recipe.run_dir / stage
        record = read_record(folder)
        parent = parent_stage(record, recipe.run_dir)
        parent_repo = repo_id(recipe, parent, user) if parent else None
        if parent_repo and (parent in stages or on_hub(parent_repo)):
            base_model, relation = parent_repo, BY_FOLDER[stage].relation
        else:  # the parent is not published: point at the upstream model, as the local card does
            base_model, relation = record.base_model, None
        repo = repo_id(recipe, stage, user)
        card = str(model_card(record, folder, repo_id=repo, base_model=base_model, relation=relation))
        files = [(p, n) for p, n in folder_files(folder) if p != "README.md"]
        files.append(("README.md", len(card.encode())))
        uploads.append(Upload(stage, folder, repo, base_model, card, sorted(files), record, parent))
    return uploads


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """What a stage folder publishes: every file except hidden and temporary ones."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) and path.suffix != ".tmp":
            out.append((rel.as_posix(), path.stat().st_size))
    return out


@contextlib.contextmanager
def hub_errors(what: str, endpoint: str, repo: str | None = None):
    """Turn huggingface_hub / network exceptions into one clear line and the right exit code."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # the HTTP client's own base error (httpx's in huggingface_hub 1.x, httpx2's in 2.x), which HfHubHTTPError
    # extends: connection failures come as it
    transport = next(c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError")
    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        server = (getattr(err, "server_message", None) or str(err).strip().splitlines()[0])[:300]
        if status == 401:
            raise PushError(f"{what}: the Hub rejected the token (401 Unauthorized). Set HF_TOKEN to a valid "
                            "write token or run `hf auth login --force`.") from None
        if status == 403:
            target = f"to {repo}" if repo else "here"
            raise PushError(f"{what}: permission denied (403 Forbidden): the token cannot write {target}. "
                            f"Use a write token with access to that namespace, or change push.user / push.repo. "
                            f"Hub says: {server}") from None
        if status is not None and status < 500 and status not in (408, 429):
            raise PushError(f"{what}: the Hub refused the request ({status}): {server}") from None
        raise PushError(f"{what}: the Hub failed ({status}): {server}. Run the same command again to finish.",
                        EXIT_RETRY) from None
    except ValueError as err:  # huggingface_hub turns the Hub's 400 on the card's metadata into this
        if "metadata" not in str(err):
            raise
        raise PushError(f"{what}: the Hub rejected the model card: {err}") from None
    except (transport, OfflineModeIsEnabled, ConnectionError, TimeoutError) as err:
        raise PushError(f"{what}: cannot reach the Hub at {endpoint} ({type(err).__name__}: {err}). Check the "
                        "network (and HF_ENDPOINT if set), then run the same command again.", EXIT_RETRY) from None


class Publisher:
    """A checked connection to the Hub for one recipe: token, user and namespace verified up front."""

    def __init__(self, recipe: Recipe):
        from huggingface_hub import HfApi, constants, get_token

        self.recipe = recipe
        self.pushed: dict[str, str] = {}  # stage -> repo id, pushed by this publisher
        if constants.is_offline_mode():
            raise PushError("push: HF_HUB_OFFLINE=1 is set, so huggingface_hub will not reach the Hub; "
                            "unset it (or set HF_HUB_OFFLINE=0) to push")
        token = get_token()
        if not token:
            raise PushError("push: no Hugging Face token found. Set HF_TOKEN to a write token "
                            "(https://huggingface.co/settings/tokens) or run `hf auth login`.")
        self.api = HfApi(token=token)  # the only place the token goes
        with hub_errors("push: checking the token", self.api.endpoint):
            me = self.api.whoami(cache=True)  # the whoami endpoint is rate-limited: once per process
        if me.get("auth", {}).get("accessToken", {}).get("role") == "read":
            raise PushError(f"push: the token of '{me['name']}' is read-only; create a write token at "
                            "https://huggingface.co/settings/tokens and set HF_TOKEN or run `hf auth login`.")
        self.user = recipe.push.user or me["name"]
        namespaces = {me["name"], *(o["name"] for o in me.get("orgs", []) if o.get("name"))}
        for stage in MODEL_FOLDERS:  # a repo elsewhere would fail half-way through the push: refuse up front
            repo = repo_id(recipe, stage, self.user)
            if repo.split("/")[0] not in namespaces:
                raise PushError(f"push: {repo} is in the namespace '{repo.split('/')[0]}', which the token's user "
                                f"cannot write to (it can write to: {', '.join(sorted(namespaces))}). Set push.user "
                                "to your user or one of your orgs, or fix push.repo.")

    def push(self, stages: list[str]) -> list[Upload]:
        """Create each repo if needed and upload its folder, in pipeline order; return what was pushed."""
        uploads = plan(self.recipe, stages, self.user, on_hub=self._on_hub)
        done: list[Upload] = []
        for up in uploads:
            try:
                self._upload(up)
            except PushError as err:
                pushed = ", ".join(d.repo_id for d in done) or "nothing"
                err.args = (f"{err}\nPushed before this failure: {pushed}. Not pushed: "
                            f"{', '.join(u.stage for u in uploads[len(done):])}.",)
                raise
            done.append(up)
            self.pushed[up.stage] = up.repo_id
            log.info("push: %s → %s/%s (%d files, %s)", up.stage, self.api.endpoint, up.repo_id, len(up.files),
                     human(up.size))
        return done

    def after_stage(self, stage: str) -> None:
        """`push_to_hub: true`: push what a runner stage just wrote (evaluate refreshes the cards' metrics)."""
        if stage == "evaluate":
            names = [s for s in self.recipe.evaluate.models or MODEL_FOLDERS if read_record(self.recipe.run_dir / s)]
        else:
            names = [BY_NAME[stage].folder]
        names = [s for s in names if s in (self.recipe.push.stages or MODEL_FOLDERS)]
        if not names:
            return
        try:
            self.push(choose(self.recipe, names))
        except PushError as err:
            err.args = (f"{err}\nThe {stage} stage itself finished and its folder is kept; publish it later with "
                        "`python -m pipeline push <recipe>`.",)
            raise

    def _on_hub(self, repo: str) -> bool:
        if repo in self.pushed.values():
            return True
        with hub_errors(f"push: looking up {repo}", self.api.endpoint, repo):
            return self.api.repo_exists(repo)

    def _upload(self, up: Upload) -> None:
        what = f"push: {up.stage} → {up.repo_id}"
        # The Hub card differs from the local one (lineage, repo id), so upload a twin folder of hard
        # links plus the Hub card; upload_folder then sends it as one commit.
        with tempfile.TemporaryDirectory(dir=up.folder.parent, prefix=f".push-{up.stage}-") as tmp:
            for rel, _ in up.files:
                if rel != "README.md":
                    _link(up.folder / rel, Path(tmp) / rel)
            (Path(tmp) / "README.md").write_text(up.card)
            with hub_errors(what, self.api.endpoint, up.repo_id):
                self.api.create_repo(up.repo_id, private=self.recipe.push.private, exist_ok=True)
                self.api.upload_folder(
                    folder_path=tmp,
                    repo_id=up.repo_id,
                    commit_message=f"llm-pipeline: recipe {self.recipe.name}, stage {up.stage}",
                    commit_description=f"Stage `{up.stage}` of the recipe `{self.recipe.name}` "
                    f"(fingerprint {up.record.fingerprint}), made from {up.base_model or 'its source'}.",
                )


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this filesystem
        shutil.copy2(src, dst)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def dry_run(recipe: Recipe, stages: list[str] | None = None) -> str:
    """The plan as text: repos, files and sizes, and each card. Reads local files only."""
    from huggingface_hub import constants

    names = choose(recipe, stages)
    user = recipe.push.user or "<user>"
    uploads = plan(recipe, names, user, on_hub=lambda repo: True)
    if os.environ.get("HF_TOKEN"):
        token = "found in HF_TOKEN"
    elif Path(constants.HF_TOKEN_PATH).is_file():
        token = "found (hf auth login)"
    else:
        token = "none found: set HF_TOKEN or run `hf auth login` before pushing"
    lines = [f"Dry run: nothing is sent to the Hub ({constants.ENDPOINT}).",
             f"Token: {token}." + ("" if recipe.push.user else " <user> is the token's user (whoami)."), ""]
    for up in uploads:
        lines.append(f"{up.stage} → {up.repo_id} ({'private' if recipe.push.private else 'public'} if created; "
                     f"base_model: {up.base_model or 'none'})")
        if up.parent and up.parent not in names:
            lines.append(f"  (assumes {up.base_model} is already on the Hub; a real push checks, and otherwise "
                         f"uses {up.record.base_model or 'no base model'})")
        width = max(len(p) for p, _ in up.files)
        lines += [f"  {p:<{width}}  {human(n):>9}" for p, n in up.files]
        lines.append(f"  {'total':<{width}}  {human(up.size):>9}")
        if not up.record.evaluation:
            lines.append("  note: not evaluated yet; run the evaluate stage to put perplexity in the card")
        lines += ["", f"--- {up.repo_id}: README.md ---", up.card.rstrip(), "--- end ---", ""]
    return "\n".join(lines)


def push(recipe: Recipe, stages: list[str] | None = None) -> list[Upload]:
    names = choose(recipe, stages)
    require_finished(recipe, names)  # before any network
    return Publisher(recipe).push(names)
