"""A stand-in for the Hugging Face hub on 127.0.0.1: the few endpoints ``huggingface_hub``'s
``repo_info(files_metadata=True)`` and ``hf_hub_download`` call, so tests drive the real client.

- ``GET /api/{models|datasets}/{repo}[/revision/{rev}]``: id, sha, siblings (rfilename, size,
  blobId, and lfs {sha256, size, pointerSize} for large files);
- ``HEAD|GET /[datasets/]{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (the LFS
  SHA-256, or the git blob SHA-1), ``Content-Length``; ``Range: bytes=N-`` answered with 206.

Test hooks: ``stall[(repo, file)] = n`` sends the first n bytes of the first GET of that file,
then stalls (the test kills the client mid-file); ``corrupt`` serves other bytes than the ones
the metadata describes. Every request is logged in ``requests``.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

LFS_MIN = 10_000


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    files: dict[str, bytes]
    sha: str = field(default="")

    def __post_init__(self):
        h = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            h.update(name.encode() + self.files[name])
        self.sha = h.hexdigest()

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        out = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
        if len(data) >= LFS_MIN:
            out["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out

    def etag(self, name: str) -> str:
        s = self.sibling(name)
        return s["lfs"]["sha256"] if "lfs" in s else s["blobId"]


class HubStandIn:
    def __init__(self, repos: list[Repo]):
        self.repos = {(r.repo_type, r.repo_id): r for r in repos}
        self.requests: list[tuple[str, str, str | None]] = []
        self.stall: dict[tuple[str, str], int] = {}
        self.corrupt: set[tuple[str, str]] = set()
        self._stalled: set[tuple[str, str]] = set()
        self.app = self._make_app()
        self._server = None
        self._thread = None
        self.url = ""

    def _make_app(self):
        app = FastAPI()

        def find(kind: str, repo_id: str) -> Repo:
            repo = self.repos.get((kind, repo_id))
            if repo is None:
                raise HTTPException(404, headers={"X-Error-Code": "RepoNotFound"}, detail="Repository not found")
            return repo

        @app.get("/api/{plural}/{rest:path}")
        def info(plural: str, rest: str, request: Request):
            self.requests.append(("GET", request.url.path, None))
            kind = {"models": "model", "datasets": "dataset"}.get(plural)
            if kind is None:
                raise HTTPException(404)
            repo_id = rest.split("/revision/")[0]
            repo = find(kind, repo_id)
            return JSONResponse({"id": repo.repo_id, "sha": repo.sha, "siblings": [repo.sibling(n) for n in sorted(repo.files)]})

        @app.api_route("/{rest:path}", methods=["GET", "HEAD"])
        async def resolve(rest: str, request: Request):
            rng = request.headers.get("range")
            self.requests.append((request.method, request.url.path, rng))
            kind = "model"
            if rest.startswith("datasets/"):
                kind, rest = "dataset", rest[len("datasets/") :]
            if "/resolve/" not in rest:
                raise HTTPException(404)
            repo_id, tail = rest.split("/resolve/", 1)
            _revision, _, name = tail.partition("/")
            repo = find(kind, repo_id)
            if name not in repo.files:
                raise HTTPException(404, headers={"X-Error-Code": "EntryNotFound"}, detail="Entry not found")
            data = repo.files[name]
            if (repo_id, name) in self.corrupt:
                data = bytes(b ^ 0xFF for b in data[:8]) + data[8:]
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{repo.etag(name)}"', "Accept-Ranges": "bytes"}
            if request.method == "HEAD":
                return Response(status_code=200, headers=headers | {"Content-Length": str(len(data))})
            start = 0
            status = 200
            if rng and rng.startswith("bytes="):
                start = int(rng[len("bytes=") :].split("-")[0] or 0)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            headers["Content-Length"] = str(len(body))
            key = (repo_id, name)
            if key in self.stall and key not in self._stalled:
                self._stalled.add(key)
                first = self.stall[key]

                async def stalled():
                    yield body[:first]
                    for _ in range(600):  # bounded: 60 s at most
                        await asyncio.sleep(0.1)
                    yield body[first:]

                return StreamingResponse(stalled(), status_code=status, headers=headers)
            return Response(content=body, status_code=status, headers=headers)

        return app

    def __enter__(self) -> HubStandIn:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("stand-in hub did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
