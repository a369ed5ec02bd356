"""A local stand-in for the Hugging Face Hub, serving the routes huggingface_hub 1.33 calls to publish.

whoami (`GET /api/whoami-v2`), create_repo (`POST /api/repos/create`), repo_info / repo_exists
(`GET /api/models/{id}[/revision/{rev}]`), and upload_folder: `POST /api/validate-yaml` (the card's
metadata), `POST /api/models/{id}/preupload/{rev}` and the NDJSON `POST /api/models/{id}/commit/{rev}`.

Preupload answers `uploadMode: regular` for every file, so upload_folder sends the bytes base64-encoded
inside the commit payload instead of through LFS/Xet storage (which the real Hub uses for large or binary
files and which cannot be served locally). Everything else is what huggingface_hub does against the Hub:
the same requests, the same skip of files whose `oid` (git blob sha1) the repo already has.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml
from huggingface_hub.utils.sha import git_hash

REPO = r"/api/models/(?P<repo>[\w.-]+/[\w.-]+)"
WRITE_ROLES = {"admin", "write", "contributor"}


class FakeHub:
    def __init__(self, users: dict[str, dict], upstream: set[str] = frozenset()):
        """`users`: token -> {"name", "orgs": {org: role}, "role": token role}; `upstream`: public repos."""
        self.users = users
        self.repos: dict[str, dict] = {r: {"private": False, "owner": r.split("/")[0], "files": {}, "commits": []}
                                       for r in upstream}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.auth_headers: dict[str, set[str]] = {}  # route -> Authorization headers seen
        self.fail: dict[tuple[str, str], str | int] = {}  # (route, repo) -> "drop" or an HTTP status
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- what tests assert on --------------------------------------------------------------------
    def routes(self) -> list[str]:
        """Requests as `METHOD /route` with the repo id replaced by {repo}."""
        return [m + " " + re.sub(r"^/api/models/[\w.-]+/[\w.-]+", "/api/models/{repo}", p.split("?")[0])
                for m, p, _ in self.requests]

    def card(self, repo: str) -> tuple[dict, str]:
        text = self.repos[repo]["files"]["README.md"].decode()
        _, meta, body = text.split("---", 2)
        return yaml.safe_load(meta), body

    # -- the API ---------------------------------------------------------------------------------
    def user_for(self, route: str, headers) -> dict | None:
        auth = headers.get("Authorization", "")
        self.auth_headers.setdefault(route, set()).add(auth)
        return self.users.get(auth.removeprefix("Bearer "))

    @staticmethod
    def can_write(user: dict | None, namespace: str) -> bool:
        return user is not None and (user["role"] != "read") and (
            namespace == user["name"] or user.get("orgs", {}).get(namespace) in WRITE_ROLES)

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict] | str:
        route = path.split("?")[0]
        user = self.user_for(route, headers)
        if method == "GET" and route == "/api/whoami-v2":
            if user is None:
                return 401, {"error": "Invalid credentials in Authorization header"}
            return 200, {"type": "user", "name": user["name"],
                         "orgs": [{"name": o, "roleInOrg": r} for o, r in user.get("orgs", {}).items()],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "t", "role": user["role"]}}}
        if method == "POST" and route == "/api/repos/create":
            payload = json.loads(body)
            if user is None:
                return 401, {"error": "Invalid credentials in Authorization header"}
            namespace = payload.get("organization") or user["name"]
            repo = f"{namespace}/{payload['name']}"
            if not self.can_write(user, namespace):
                return 403, {"error": f'You don\'t have the rights to create a model under the namespace "{namespace}"'}
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            self.repos[repo] = {"private": payload.get("visibility") == "private", "owner": namespace,
                                "files": {}, "commits": [], "payload": payload}
            return 200, {"url": f"{self.url}/{repo}", "name": repo}
        if method == "POST" and route == "/api/validate-yaml":
            meta = yaml.safe_load(json.loads(body)["content"].split("---")[1]) or {}
            base = meta.get("base_model")
            if base and base not in self.repos:  # the Hub only accepts ids of models it has
                return 400, {"errors": [{"message": f'"base_model" with value "{base}" is not a valid model id'}]}
            return 200, {"errors": [], "warnings": []}
        if m := re.fullmatch(REPO + r"(/revision/(?P<rev>[^/]+))?", route):
            repo = self.repos.get(m["repo"])
            if method != "GET" or repo is None or (repo["private"] and not self.can_read(user, repo)):
                return _not_found()
            return 200, {"id": m["repo"], "sha": self.head(m["repo"]), "private": repo["private"],
                         "siblings": [{"rfilename": f} for f in sorted(repo["files"])]}
        if m := re.fullmatch(REPO + r"/(?P<op>preupload|commit)/(?P<rev>[^/]+)", route):
            repo = self.repos.get(m["repo"])
            if repo is None:
                return _not_found()
            failure = self.fail.get((m["op"], m["repo"]))
            if failure == "drop":
                return "drop"
            if failure:
                return failure, {"error": "injected failure"}
            if not self.can_write(user, repo["owner"]):
                return 403, {"error": f"You don't have write access to {m['repo']}"}
            if m["op"] == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": _oid(repo["files"].get(f["path"]))} for f in files]}
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            added = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
            with self.lock:
                repo["files"].update(added)
                repo["commits"].append({"summary": header["summary"], "description": header.get("description"),
                                        "files": sorted(added)})
            return 200, {"commitUrl": f"{self.url}/{m['repo']}/commit/{self.head(m['repo'])}",
                         "commitOid": self.head(m["repo"]), "pullRequestUrl": None}
        return 404, {"error": f"fake hub: no route {method} {route}"}

    def can_read(self, user, repo) -> bool:
        return user is not None and (repo["owner"] == user["name"] or repo["owner"] in user.get("orgs", {}))

    def head(self, repo: str) -> str:
        return hashlib.sha1(json.dumps(self.repos[repo]["commits"]).encode()).hexdigest()


def _oid(content: bytes | None) -> str | None:
    return git_hash(content) if content is not None else None


def _not_found():
    return 404, {"error": "Repository not found"}


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            result = hub.handle(self.command, self.path, self.headers, body)
            if result == "drop":  # the connection dies before any answer, as on a network failure
                hub.requests.append((self.command, self.path, 0))
                self.close_connection = True
                self.connection.shutdown(2)
                return
            status, payload = result
            hub.requests.append((self.command, self.path, status))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 404:
                self.send_header("X-Error-Code", "RepoNotFound")
            if "error" in payload:
                self.send_header("X-Error-Message", payload["error"])
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _serve

        def log_message(self, *args):  # keep pytest output clean
            pass

    return Handler
