"""A minimal Hugging Face hub on 127.0.0.1, for push and fetch tests (the real hub is
unreachable here).

It answers exactly the requests huggingface_hub 2.x makes for ``create_repo``,
``create_branch``, ``upload_folder`` (``validate-yaml``, ``preupload``: every file declared
"regular", so the commit carries them base64-encoded; ``commit``) and, for
``snapshot_download``, ``repo_info`` (``revision``), ``list_repo_tree`` and the per-file
``resolve`` HEAD and GET. Files are kept in a temporary folder by their sha256 and served
back byte for byte; each commit is a new tree (path -> blob) with a sha1 commit id, and
branches point at commits. ``token``: when set, every request must carry it
(``Authorization: Bearer ...``), else 401, as the hub answers a bad token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


@dataclass
class _Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    commits: dict[str, dict[str, str]] = field(default_factory=dict)  # commit id -> {path: sha256 of the blob}


class HubStandIn:
    """The stand-in's state and its FastAPI app; :meth:`serve` runs it in a thread."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.blobs = Path(tempfile.mkdtemp(prefix="hub-standin-"))
        self.repos: dict[str, _Repo] = {}
        self.requests: list[str] = []  # "METHOD path", for tests that check what was asked
        self.app = self._build()

    # -- storage ------------------------------------------------------------------------------

    def _put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (self.blobs / digest).write_bytes(data)
        return digest

    def _blob(self, digest: str) -> bytes:
        return (self.blobs / digest).read_bytes()

    def _commit(self, repo: _Repo, revision: str) -> str | None:
        if revision in repo.commits:
            return revision
        return repo.branches.get(revision)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """What the repo holds at ``revision`` (for tests)."""
        repo = self.repos[repo_id]
        return {path: self._blob(d) for path, d in repo.commits[self._commit(repo, revision)].items()}

    # -- the app ------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI()
        standin = self

        @app.middleware("http")
        async def authenticate(request: Request, call_next: Any) -> Any:
            standin.requests.append(f"{request.method} {request.url.path}")
            if standin.token and request.headers.get("authorization") != f"Bearer {standin.token}":
                return JSONResponse({"error": "Invalid credentials in Authorization header"}, status_code=401)
            return await call_next(request)

        def missing(what: str) -> JSONResponse:
            return JSONResponse({"error": f"{what} not found"}, status_code=404,
                                headers={"X-Error-Code": "RepoNotFound" if what == "Repository" else "RevisionNotFound"})

        @app.post("/api/repos/create")
        async def create_repo(request: Request) -> JSONResponse:
            body = await request.json()
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            if repo_id in standin.repos:
                return JSONResponse({"error": "You already created this model repo", "url": f"/{repo_id}"}, status_code=409)
            repo = standin.repos[repo_id] = _Repo(private=body.get("visibility") == "private" or bool(body.get("private")))
            empty = hashlib.sha1(repo_id.encode()).hexdigest()
            repo.commits[empty] = {}
            repo.branches["main"] = empty
            return JSONResponse({"url": f"{request.base_url}{repo_id}", "name": repo_id})

        @app.post("/api/models/{org}/{name}/branch/{branch}")
        async def create_branch(org: str, name: str, branch: str) -> JSONResponse:
            repo = standin.repos.get(f"{org}/{name}")
            if repo is None:
                return missing("Repository")
            if branch in repo.branches:
                return JSONResponse({"error": "Reference already exists"}, status_code=409)
            repo.branches[branch] = repo.branches["main"]
            return JSONResponse({})

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request) -> JSONResponse:
            content = (await request.json()).get("content", "")
            if content.startswith("---"):
                try:
                    yaml.safe_load(content.split("---", 2)[1])
                except yaml.YAMLError as exc:
                    return JSONResponse({"errors": [{"message": str(exc)}]}, status_code=400)
            return JSONResponse({"errors": [], "warnings": []})

        @app.post("/api/models/{org}/{name}/preupload/{revision}")
        async def preupload(org: str, name: str, revision: str, request: Request) -> JSONResponse:
            repo = standin.repos.get(f"{org}/{name}")
            if repo is None:
                return missing("Repository")
            files = (await request.json())["files"]
            return JSONResponse({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                           for f in files]})

        @app.post("/api/models/{org}/{name}/commit/{revision}")
        async def commit(org: str, name: str, revision: str, request: Request) -> JSONResponse:
            repo = standin.repos.get(f"{org}/{name}")
            if repo is None:
                return missing("Repository")
            parent = repo.branches.get(revision)
            if parent is None:
                return missing("Revision")
            tree = dict(repo.commits[parent])
            for line in (await request.body()).splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    tree[item["value"]["path"]] = standin._put(base64.b64decode(item["value"]["content"]))
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    tree.pop(item["value"]["path"], None)
                elif item["key"] != "header":
                    return JSONResponse({"error": f"the stand-in takes regular files only, not {item['key']}"}, status_code=400)
            oid = hashlib.sha1(json.dumps([parent, sorted(tree.items())]).encode()).hexdigest()
            repo.commits[oid] = tree
            repo.branches[revision] = oid
            return JSONResponse({"commitUrl": f"{request.base_url}{org}/{name}/commit/{oid}", "commitOid": oid})

        def at_revision(org: str, name: str, revision: str) -> tuple[Any, str | None]:
            """(repo, commit oid), or (the 404 response, None)."""
            repo = standin.repos.get(f"{org}/{name}")
            if repo is None:
                return missing("Repository"), None
            oid = standin._commit(repo, revision)
            return (repo, oid) if oid is not None else (missing("Revision"), None)

        @app.get("/api/models/{org}/{name}")
        @app.get("/api/models/{org}/{name}/revision/{revision}")
        async def repo_info(org: str, name: str, revision: str = "main") -> JSONResponse:
            repo, oid = found = at_revision(org, name, revision)
            if oid is None:
                return found[0]
            return JSONResponse({"id": f"{org}/{name}", "sha": oid, "private": repo.private,
                                 "siblings": [{"rfilename": p} for p in sorted(repo.commits[oid])]})

        @app.get("/api/models/{org}/{name}/tree/{revision}")
        async def tree(org: str, name: str, revision: str) -> JSONResponse:
            repo, oid = found = at_revision(org, name, revision)
            if oid is None:
                return found[0]
            return JSONResponse([{"type": "file", "path": p, "size": len(standin._blob(d)), "oid": _git_oid(standin._blob(d))}
                                 for p, d in sorted(repo.commits[oid].items())])

        @app.api_route("/{org}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        async def resolve(org: str, name: str, revision: str, path: str, request: Request) -> Response:
            repo = standin.repos.get(f"{org}/{name}")
            if repo is None:
                return missing("Repository")
            oid = standin._commit(repo, revision)
            if oid is None or path not in repo.commits[oid]:
                return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound", **({"X-Repo-Commit": oid} if oid else {})})
            data = standin._blob(repo.commits[oid][path])
            headers = {"X-Repo-Commit": oid, "ETag": f'"{_git_oid(data)}"', "Content-Length": str(len(data))}
            return Response(b"" if request.method == "HEAD" else data, headers=headers,
                            media_type="application/octet-stream")

        return app

    # -- running ------------------------------------------------------------------------------

    def serve(self) -> tuple[str, Any]:
        """Start on a free port of 127.0.0.1 in a daemon thread; returns (endpoint, stop)."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)

        def stop() -> None:
            server.should_exit = True
            thread.join(timeout=10)

        return f"http://127.0.0.1:{port}", stop


def _git_oid(data: bytes) -> str:
    """The git blob id of ``data`` (what the hub gives a regular file as its ETag and oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
