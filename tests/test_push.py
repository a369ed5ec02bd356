"""Publishing to the Hub, against a local stand-in for the Hub API (tests/hub_server.py).

huggingface_hub reads HF_ENDPOINT once, at import, into `huggingface_hub.constants.ENDPOINT`, and
`HfApi()` takes its endpoint from that constant when it is created. In-process tests therefore set
both the variable and the constant; `test_cli_in_a_subprocess_uses_hf_endpoint` runs the real command
in a fresh interpreter with only HF_ENDPOINT set, as a user would.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from hub_server import FakeHub
from pipeline.cli import main

TOKEN = "hf_TESTtokenNeverShown0123456789"  # distinctive, so a leak anywhere is easy to find
USERS = {
    TOKEN: {"name": "alice", "orgs": {"acme": "write", "bigco": "read"}, "role": "write"},
    "hf_readonly": {"name": "alice", "orgs": {}, "role": "read"},
}
PUSHED = ["base", "finetune", "quantize"]  # distill is off in this run: quantize reads finetune
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe(tiny_models, tmp_path_factory) -> Path:
    """A finished tiny run (load, a 2-step finetune, bnb int8 quantize, evaluate) shared by these tests."""
    root = tmp_path_factory.mktemp("push")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_models["gpt2"]), "name": "tiny", "output_dir": str(root / "runs"),
        "check_source": False,  # a random tiny model: the source gate would refuse it
        "data": {"block_size": 64, "max_train_blocks": 16},
        "finetune": {"max_steps": 2, "batch_size": 8},
        "distill": {"enabled": False},
        "evaluate": {"context": 64, "stride": 32, "max_tokens": 256, "models": PUSHED},
    }))
    assert main(["run", str(path)]) == 0
    return path


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub(USERS) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # CI sets HF_HUB_OFFLINE=1 for the rest
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        yield server


def _run_dir(recipe: Path) -> Path:
    return recipe.parent / "runs" / "tiny"


def _hub_calls(hub) -> list[str]:
    # huggingface_hub also fetches a best-effort telemetry registry; it is not part of publishing
    return [r for r in hub.routes() if r != "GET /api/agent-harnesses"]


def _assert_no_token_leak(*texts: str, folders=()):
    for text in texts:
        assert TOKEN not in text
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_push_creates_repos_uploads_folders_and_cards_show_lineage(recipe, hub, capsys, caplog):
    assert main(["push", str(recipe)]) == 0
    out = capsys.readouterr()
    run_dir = _run_dir(recipe)
    repos = [f"alice/tiny-{s}" for s in PUSHED]
    assert sorted(hub.repos) == sorted(repos)
    for stage, repo in zip(PUSHED, repos):
        created = hub.repos[repo]
        assert created["private"] is True and created["payload"]["name"] == f"tiny-{stage}"
        local = sorted(p.name for p in (run_dir / stage).iterdir() if p.is_file())
        assert sorted(created["files"]) == local  # every file of the folder, nothing else
        assert created["files"]["model.safetensors"] == (run_dir / stage / "model.safetensors").read_bytes()
        assert created["files"]["pipeline.json"] == (run_dir / stage / "pipeline.json").read_bytes()
        (commit,) = created["commits"]
        assert commit["summary"] == f"llm-pipeline: recipe tiny, stage {stage}"
        assert f"pushed {stage} → {repo}" in out.out
    # one whoami, then per repo: create, card validation, preupload, commit; in pipeline order
    assert _hub_calls(hub) == ["GET /api/whoami-v2"] + [
        "POST /api/repos/create", "POST /api/validate-yaml", "POST /api/models/{repo}/preupload/main",
        "POST /api/models/{repo}/commit/main"] * 3
    assert [p.split("/")[4] for m, p, _ in hub.requests if p.endswith("/commit/main")] == [
        "tiny-base", "tiny-finetune", "tiny-quantize"]

    # Lineage: the local base was a folder (no upstream id); each later stage points at its parent's repo.
    cards = {s: hub.card(f"alice/tiny-{s}") for s in PUSHED}
    assert "base_model" not in cards["base"][0]
    assert cards["finetune"][0]["base_model"] == "alice/tiny-base"
    assert cards["finetune"][0]["base_model_relation"] == "finetune"
    assert cards["quantize"][0]["base_model"] == "alice/tiny-finetune"
    assert cards["quantize"][0]["base_model_relation"] == "quantized"
    for stage, (meta, body) in cards.items():
        record = json.loads((run_dir / stage / "pipeline.json").read_text())
        assert meta["library_name"] == "transformers" and "llm-pipeline" in meta["tags"]
        result = meta["model-index"][0]["results"][0]
        assert result["dataset"]["name"] == record["evaluation"][0]["dataset"] == "python-stdlib-pydoc-topics"
        assert result["metrics"][0]["type"] == "perplexity"
        assert result["metrics"][0]["value"] == pytest.approx(record["evaluation"][0]["perplexity"], abs=1e-4)
        assert 1 < result["metrics"][0]["value"] < 2000  # a random 512-token model is near 512
        assert f'from_pretrained("alice/tiny-{stage}"' in body and "path/or/repo-id" not in body
        assert str(run_dir) not in body  # no local paths in a published card
    assert "[alice/tiny-base](/alice/tiny-base)" in cards["finetune"][1]
    assert "bitsandbytes" in cards["quantize"][1] and 'device_map="auto"' in cards["quantize"][1]
    assert "bitsandbytes" not in cards["finetune"][1]
    # The local cards are untouched: they still describe the folder, not the Hub repo.
    assert "alice" not in (run_dir / "finetune" / "README.md").read_text()
    assert not list(run_dir.glob(".push-*"))  # the upload twin folders are gone

    # The token went to the Hub in the Authorization header, and nowhere else.
    seen = {auth for route, auths in hub.auth_headers.items() if route != "/api/agent-harnesses" for auth in auths}
    assert seen == {f"Bearer {TOKEN}"}
    _assert_no_token_leak(out.out, out.err, caplog.text, folders=[recipe.parent])


def test_dry_run_prints_plan_and_cards_and_touches_no_network(recipe, hub, capsys):
    assert main(["push", str(recipe), "--dry-run", "--stages", "finetune,quantize"]) == 0
    out = capsys.readouterr().out
    assert hub.requests == []
    assert "finetune → <user>/tiny-finetune (private if created" in out
    assert "quantize → <user>/tiny-quantize" in out and "tiny-base (" not in out
    size = (_run_dir(recipe) / "quantize" / "model.safetensors").stat().st_size
    assert ["model.safetensors", f"{size / 1024:.1f}", "KB"] in [line.split() for line in out.splitlines()]
    assert "README.md" in out and "pipeline.json" in out and "total" in out
    # finetune's parent (base) is not in this push, so the plan says what it assumes
    assert "assumes <user>/tiny-base is already on the Hub" in out
    assert "base_model: <user>/tiny-finetune" in out and "base_model_relation: quantized" in out
    assert "Token: found in HF_TOKEN" in out and TOKEN not in out
    assert main(["push", str(recipe), "push.user=acme", "push.private=false", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "base → acme/tiny-base (public if created; base_model: none)" in out
    assert hub.requests == []


def test_no_token_is_a_clear_error_before_any_request(recipe, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "HF_TOKEN" in err and "hf auth login" in err
    assert hub.requests == [] and hub.repos == {}


def test_token_from_hf_auth_login_file_is_used(recipe, hub, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN")
    stored = tmp_path / "stored-token"
    stored.write_text(TOKEN)  # what `hf auth login` writes
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(stored))
    assert main(["push", str(recipe), "--stages", "base"]) == 0
    assert list(hub.repos) == ["alice/tiny-base"]
    assert TOKEN not in "".join(capsys.readouterr())


def test_rejected_token_401(recipe, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    assert main(["push", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "401" in err and "rejected the token" in err and "hf_revoked" not in err
    assert _hub_calls(hub) == ["GET /api/whoami-v2"] and hub.repos == {}


def test_read_only_token(recipe, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_readonly")
    assert main(["push", str(recipe)]) == 2
    assert "read-only" in capsys.readouterr().err and hub.repos == {}


def test_namespace_owned_by_someone_else_fails_before_any_upload(recipe, hub, capsys):
    assert main(["push", str(recipe), "push.user=bob"]) == 2
    err = capsys.readouterr().err
    assert "alice/" not in err and "bob/tiny-base is in the namespace 'bob'" in err
    assert "acme, alice, bigco" in err and "push.user" in err
    assert _hub_calls(hub) == ["GET /api/whoami-v2"] and hub.repos == {}


def test_forbidden_403_names_the_repo_and_claims_nothing(recipe, hub, capsys):
    # alice is a member of bigco with read access only: the Hub answers 403
    assert main(["push", str(recipe), "push.user=bigco"]) == 2
    out, err = capsys.readouterr()
    assert "403" in err and "bigco/tiny-base" in err and "Pushed before this failure: nothing" in err
    assert "pushed " not in out and hub.repos == {}


def test_network_unreachable(recipe, hub, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert main(["push", str(recipe)]) == 1
    out, err = capsys.readouterr()
    assert f"cannot reach the Hub at http://127.0.0.1:{port}" in err and "run the same command again" in err
    assert "pushed " not in out


def test_connection_lost_mid_push_then_rerun_finishes(recipe, hub, monkeypatch, capsys):
    hub.fail[("commit", "alice/tiny-finetune")] = "drop"
    # huggingface_hub retries a dropped commit 5 times with 1-8 s back-off; skip the waiting
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)
    assert main(["push", str(recipe)]) == 1
    out, err = capsys.readouterr()
    assert "cannot reach the Hub" in err
    assert "Pushed before this failure: alice/tiny-base. Not pushed: finetune, quantize." in err
    assert out.splitlines() == []  # nothing claimed as done on stdout
    assert hub.repos["alice/tiny-finetune"]["files"] == {}  # the dropped commit left nothing
    assert "alice/tiny-quantize" not in hub.repos

    hub.fail.clear()
    assert main(["push", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert all(f"pushed {s}" in out for s in PUSHED)
    assert len(hub.repos["alice/tiny-base"]["commits"]) == 1  # unchanged: not uploaded again
    assert len(hub.repos["alice/tiny-finetune"]["commits"]) == 1
    assert hub.card("alice/tiny-quantize")[0]["base_model"] == "alice/tiny-finetune"


def test_pushing_a_stage_alone_links_an_existing_parent_or_falls_back(recipe, hub, capsys):
    assert main(["push", str(recipe), "--stages", "quantize"]) == 0  # finetune is not on the Hub
    assert "base_model" not in hub.card("alice/tiny-quantize")[0]  # upstream: none for a local folder
    assert main(["push", str(recipe), "--stages", "finetune"]) == 0
    assert main(["push", str(recipe), "--stages", "quantize"]) == 0  # now it is
    assert hub.card("alice/tiny-quantize")[0]["base_model"] == "alice/tiny-finetune"
    assert hub.repos["alice/tiny-quantize"]["commits"][-1]["files"] == ["README.md"]


def test_unfinished_stage_and_bad_template_fail_before_network(recipe, hub, capsys):
    assert main(["push", str(recipe), "--stages", "distill"]) == 2
    assert "no finished distill folder" in capsys.readouterr().err
    assert main(["push", str(recipe), "push.repo=alice/{recipe}"]) == 2
    assert "has no {stage}" in capsys.readouterr().err
    assert main(["push", str(recipe), "--stages", "polish"]) == 2
    assert "unknown stage(s) polish" in capsys.readouterr().err
    assert hub.requests == []


def test_offline_mode_is_a_clear_error(recipe, hub, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(recipe)]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and hub.requests == []


def test_push_to_hub_pushes_each_stage_when_it_finishes(recipe, hub, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(_run_dir(recipe), runs / "tiny")
    assert main(["push", str(recipe), f"output_dir={runs}", "--stages", "finetune"]) == 0
    overrides = [f"output_dir={runs}", "push.push_to_hub=true", "evaluate.models=[quantize]"]
    assert main(["run", str(recipe), *overrides, "--force", "--stages", "quantize,evaluate"]) == 0
    quantize = hub.repos["alice/tiny-quantize"]["commits"]
    # pushed as soon as it finished (no perplexity yet), then again once evaluate updated its card
    assert len(quantize) == 2 and len(quantize[0]["files"]) == 7
    assert quantize[1]["files"] == ["README.md", "pipeline.json"]  # the weights are not sent twice
    meta = hub.card("alice/tiny-quantize")[0]
    assert meta["base_model"] == "alice/tiny-finetune"  # already on the Hub: the lineage links it
    assert meta["model-index"][0]["results"][0]["metrics"][0]["type"] == "perplexity"
    assert len(hub.repos["alice/tiny-finetune"]["commits"]) == 1 and "alice/tiny-base" not in hub.repos


def test_cli_in_a_subprocess_uses_hf_endpoint(recipe, hub):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "push", str(recipe), "--stages", "base"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pushed base → alice/tiny-base" in proc.stdout and list(hub.repos) == ["alice/tiny-base"]
    _assert_no_token_leak(proc.stdout, proc.stderr)


def test_without_hf_xet_upload_folder_takes_the_single_commit_path(recipe, hub, monkeypatch):
    # upload_folder streams through hf_xet when it is installed, else makes one create_commit
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    assert main(["push", str(recipe), "--stages", "base"]) == 0
    assert _hub_calls(hub).count("POST /api/validate-yaml") == 2  # create_commit checks the card again
    assert sorted(hub.repos["alice/tiny-base"]["files"]) == sorted(
        p.name for p in (_run_dir(recipe) / "base").iterdir() if p.is_file())


def test_card_the_hub_rejects_is_a_clear_error(recipe, hub, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(_run_dir(recipe), runs / "tiny")
    record = json.loads((runs / "tiny" / "base" / "pipeline.json").read_text())
    record["base_model"] = "someone/not-on-the-hub"  # e.g. an upstream model that is private or gone
    (runs / "tiny" / "base" / "pipeline.json").write_text(json.dumps(record))
    assert main(["push", str(recipe), f"output_dir={runs}", "--stages", "base"]) == 2
    err = capsys.readouterr().err
    assert "rejected the model card" in err and "someone/not-on-the-hub" in err and "Traceback" not in err
    assert hub.repos["alice/tiny-base"]["files"] == {}
