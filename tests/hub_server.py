"""A stand-in for the Hugging Face Hub on 127.0.0.1, for the pull and search tests.

It serves repos made in a test (files in a temp dir) through the endpoints
huggingface_hub calls, with the headers it needs:

    GET       /api/models                           search: search=, filter=, sort=, limit=, expand=
    GET       /api/models/{repo}[/revision/{rev}]   model info (file sizes with blobs=true)
    GET       /api/models/{repo}/tree/{rev}         the file list
    HEAD/GET  /{repo}/resolve/{rev}/{path}          a file: small ones here (ETag = git blob
                                                    sha1); large ("LFS") ones 302 to /cdn/
                                                    on `localhost`, another host, as the
                                                    Hub's CDN is
    HEAD/GET  /cdn/{sha256}                         the bytes, with Range (206)

Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound,
EntryNotFound) so huggingface_hub raises its own exceptions. Knobs for the
tests: `rate` (bytes/s of file bodies), `stall_at` (a body stops at this
offset until `release()`); every request is recorded (method, path, Range)
so a test can see where a resumed download started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# Files at least this big, or with these suffixes, are LFS files (served from the "CDN").
LFS_BYTES = 1 << 20
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")
CHUNK = 64 * 1024


@dataclass
class FakeRepo:
    """A model repo: repo path -> the local file that holds its bytes."""

    repo_id: str
    files: dict[str, Path]
    tags: list[str] = field(default_factory=list)
    library_name: str | None = None
    downloads: int = 0
    likes: int = 0
    # Parameter count (the Hub's safetensors/gguf "total"), for search results.
    parameters: int | None = None
    sha: str = ""

    def __post_init__(self) -> None:
        if not self.sha:
            self.sha = hashlib.sha1(self.repo_id.encode()).hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES) or self.files[name].stat().st_size >= LFS_BYTES


@dataclass(frozen=True)
class Seen:
    """One request the server answered."""

    method: str
    path: str
    range: str | None


class FakeHub:
    """The server and its repos; `start()` it, point HF_ENDPOINT at `url`, `stop()` it."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.rate: float | None = None
        self.stall_at: int | None = None
        self.requests: list[Seen] = []
        self.bytes_sent = 0
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._hashes: dict[Path, tuple[str, str]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------- the test's side ----------

    def add(self, repo: FakeRepo) -> FakeRepo:
        self.repos[repo.repo_id] = repo
        return repo

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def stall(self, at: int) -> None:
        """Hold every file body at offset `at` until `release()`."""
        self._released.clear()
        self.stall_at = at

    def release(self) -> None:
        """Let stalled bodies go on (and no new one stall)."""
        self.stall_at = None
        self._released.set()

    def ranges(self, suffix: str) -> list[str | None]:
        """The Range headers of the GETs whose path ends with `suffix`, in order."""
        with self._lock:
            return [r.range for r in self.requests if r.method == "GET" and r.path.endswith(suffix)]

    def cdn_path(self, repo_id: str, name: str) -> str:
        return f"/cdn/{self.hashes(self.repos[repo_id].files[name])[0]}"

    def hashes(self, path: Path) -> tuple[str, str]:
        """(sha256, git blob sha1) of a local file, computed once."""
        with self._lock:
            known = self._hashes.get(path)
        if known is not None:
            return known
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        with self._lock:
            self._hashes[path] = (sha256, git)
        return sha256, git

    # ---------- what the handler asks ----------

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def find_blob(self, sha256: str) -> Path | None:
        for repo in self.repos.values():
            for path in repo.files.values():
                if self.hashes(path)[0] == sha256:
                    return path
        return None

    def wait_released(self) -> bool:
        return self._released.wait(0.1)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet

    # ---------- routing ----------

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        self.hub.record(Seen(self.command, path, self.headers.get("Range")))
        query = parse_qs(parts.query)
        if path == "/api/models":
            return self._search(query)
        if path.startswith("/api/models/"):
            return self._api_model(path.removeprefix("/api/models/"), query)
        if path.startswith("/cdn/"):
            blob = self.hub.find_blob(path.removeprefix("/cdn/"))
            if blob is None:
                return self._error(404, "EntryNotFound", "no such blob")
            return self._file(blob, head, {"ETag": f'"{path.removeprefix("/cdn/")}"'})
        if "/resolve/" in path:
            return self._resolve(path, head)
        self._error(404, None, f"no route {path}")

    # ---------- the API ----------

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: FakeRepo, revision: str) -> bool:
        if revision in ("main", repo.sha):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    def _api_model(self, rest: str, query: dict[str, list[str]]) -> None:
        revision = "main"
        tree = False
        if "/revision/" in rest:
            rest, revision = rest.split("/revision/", 1)
        elif "/tree/" in rest:
            rest, revision = rest.split("/tree/", 1)
            revision = revision.split("/", 1)[0]
            tree = True
        repo = self._repo(unquote(rest))
        if repo is None or not self._commit(repo, unquote(revision)):
            return
        if tree:
            return self._json([self._tree_entry(repo, n) for n in sorted(repo.files)])
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        self._json(self._info(repo, siblings=True, sizes=blobs))

    def _tree_entry(self, repo: FakeRepo, name: str) -> dict[str, Any]:
        path = repo.files[name]
        sha256, git = self.hub.hashes(path)
        size = path.stat().st_size
        entry: dict[str, Any] = {"type": "file", "path": name, "size": size, "oid": git}
        if repo.is_lfs(name):
            entry["lfs"] = {"oid": sha256, "size": size, "pointerSize": 134}
        return entry

    def _info(self, repo: FakeRepo, *, siblings: bool, sizes: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": repo.repo_id,
            "_id": repo.sha[:24],
            "modelId": repo.repo_id,
            "sha": repo.sha,
            "private": False,
            "downloads": repo.downloads,
            "likes": repo.likes,
            "tags": repo.tags,
            "library_name": repo.library_name,
            "lastModified": "2025-01-02T03:04:05.000Z",
            "usedStorage": sum(p.stat().st_size for p in repo.files.values()),
        }
        if repo.parameters is not None:
            if "gguf" in repo.tags:
                out["gguf"] = {"total": repo.parameters, "architecture": "llama"}
            else:
                out["safetensors"] = {
                    "parameters": {"BF16": repo.parameters},
                    "total": repo.parameters,
                }
        if siblings:
            out["siblings"] = []
            for name in sorted(repo.files):
                sibling: dict[str, Any] = {"rfilename": name}
                if sizes:
                    entry = self._tree_entry(repo, name)
                    sibling.update(size=entry["size"], blobId=entry["oid"])
                    if "lfs" in entry:
                        lfs = entry["lfs"]
                        sibling["lfs"] = {
                            "size": lfs["size"],
                            "sha256": lfs["oid"],
                            "pointerSize": lfs["pointerSize"],
                        }
                out["siblings"].append(sibling)
        return out

    def _search(self, query: dict[str, list[str]]) -> None:
        text = query.get("search", [""])[0].lower()
        filters = query.get("filter", [])
        expand = set(query.get("expand", []))
        found = [
            r
            for r in self.hub.repos.values()
            if text in r.repo_id.lower() and all(f in r.tags for f in filters)
        ]
        if query.get("sort", [""])[0] == "downloads":
            found.sort(key=lambda r: -r.downloads)
        limit = int(query.get("limit", ["1000"])[0])
        out = []
        for r in found[:limit]:
            info = self._info(r, siblings="siblings" in expand, sizes=False)
            if expand:  # only what was asked for (and the id), as the Hub does
                info = {k: v for k, v in info.items() if k in expand or k in ("id", "_id")}
            out.append(info)
        self._json(out)

    # ---------- files ----------

    def _resolve(self, path: str, head: bool) -> None:
        repo_part, rest = path.lstrip("/").split("/resolve/", 1)
        revision, _, name = rest.partition("/")
        repo = self._repo(unquote(repo_part))
        if repo is None:
            return
        revision, name = unquote(revision), unquote(name)
        if not self._commit(repo, revision):
            return
        local = repo.files.get(name)
        if local is None:
            return self._error(
                404, "EntryNotFound", f"{name} does not exist on {revision}", repo.sha
            )
        sha256, git = self.hub.hashes(local)
        if repo.is_lfs(name):
            # The Hub's LFS redirect: the metadata is on this response, the bytes elsewhere.
            body = b"Found."
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.hub.port}/cdn/{sha256}")
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("ETag", f'"{git}"')
            self.send_header("X-Linked-Etag", f'"{sha256}"')
            self.send_header("X-Linked-Size", str(local.stat().st_size))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        self._file(local, head, {"ETag": f'"{git}"', "X-Repo-Commit": repo.sha})

    def _file(self, local: Path, head: bool, headers: dict[str, str]) -> None:
        size = local.stat().st_size
        start, end = 0, size - 1
        wanted = self.headers.get("Range")
        status = 200
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            start = int(first or 0)
            end = int(last) if last else size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        # The client may go away mid-body (a killed node): nothing to do then.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._send_body(local, start, end + 1)

    def _send_body(self, local: Path, start: int, stop: int) -> None:
        t0 = time.monotonic()
        sent = 0
        with local.open("rb") as f:
            f.seek(start)
            offset = start
            while offset < stop:
                stall = self.hub.stall_at
                if stall is not None and offset >= stall:
                    while not self.hub.wait_released():
                        pass
                n = min(CHUNK, stop - offset)
                if stall is not None and offset < stall:
                    n = min(n, stall - offset)
                data = f.read(n)
                self.wfile.write(data)
                offset += len(data)
                sent += len(data)
                with self.hub._lock:
                    self.hub.bytes_sent += len(data)
                rate = self.hub.rate
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)

    # ---------- responses ----------

    def _json(self, data: Any) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, commit: str = "") -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
