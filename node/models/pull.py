"""Pull a model from the Hugging Face Hub into this node's HF cache, in a worker thread.

`start_pull` checks the request, joins a running pull of the same target
(node.models.transfers: single-flight per destination) or starts one, and
returns its record at once; the worker reports bytes to the record and ends it
done (the catalog rescanned, so the model is listed) or failed (with why).

huggingface_hub does the Hub's part: `model_info` for the file list, sizes and
commit; `get_hf_file_metadata` (HEAD) for each file's blob id and location;
`http_get` for the bytes (Range, retries, redirects, the token it finds in
`HF_TOKEN` or its token file); `hf_hub_download` to link a finished blob into
`snapshots/<commit>/`. One thing it no longer does (2.x): resume across
processes; each download writes a process-unique temp file, deleted on
failure. So the bytes go to `blobs/<etag>.incomplete` (the name it used
before), under its own per-blob lock, and a pull after a crash, a kill or a
full disk continues from that file's size (then checks the sha256).

Never served half-written: a blob enters the snapshot only when complete
(renamed, then linked); `config.json`, which makes the catalog look at an MLX
dir at all (node.models.scan), is linked last; and `refs/<revision>` moves to
the new commit only at the end, so the previous revision is served meanwhile.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast
from urllib.parse import urlparse

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get, repo_folder_name

# Public names that huggingface_hub.utils re-exports lazily (mypy cannot see them).
from huggingface_hub.utils import (  # type: ignore[attr-defined]
    WeakFileLock,
    build_hf_headers,
    validate_repo_id,
)

from mesh.errors import InvalidRequest, Unavailable
from mesh.types import Transfer
from node.models.catalog import Catalog
from node.models.scan import default_hf_cache
from node.models.transfers import TransferJob, Transfers

log = logging.getLogger(__name__)

DEFAULT_REVISION = "main"

# What a whole-repo pull fetches: mlx-lm's own download patterns
# (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS), so no PyTorch/ONNX copies of the weights.
MLX_PATTERNS = (
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
)
# Linked last: without it the catalog does not consider the dir a model yet.
LAST_FILE = "config.json"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SPLIT_GGUF = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf", re.IGNORECASE)


def gguf_parts(name: str, names: list[str]) -> list[str]:
    """A GGUF file and, when it is one part of a split model (`X-00001-of-00003.gguf`),
    every part of it in `names`: the first part last, as it names the model."""
    split = _SPLIT_GGUF.fullmatch(name)
    if split is None:
        return [name]
    parts = [
        n for n in names if (m := _SPLIT_GGUF.fullmatch(n)) and m.group(1, 3) == split.group(1, 3)
    ]
    return sorted(parts, reverse=True)


class PullError(Exception):
    """A pull that cannot go on; the message is what the transfer's error says."""


def hub_endpoint() -> str | None:
    """`HF_ENDPOINT` as set now (None: huggingface_hub's default).

    huggingface_hub reads it once, at import; read here at each pull, so a
    node started in-process (the tests) follows the environment of the moment.
    """
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None


@dataclass(frozen=True, slots=True)
class PullTarget:
    """What one pull fetches: a repo (its MLX files, or its only GGUF) or one file."""

    repo: str
    # "" = the whole repo.
    file: str
    revision: str

    @property
    def key(self) -> str:
        """The destination, for single-flight (and the transfer's `source`)."""
        return f"hf:{self.repo}@{self.revision}" + (f"/{self.file}" if self.file else "")

    @property
    def model(self) -> str:
        """The id the catalog serves it under: the repo id, or a GGUF file's name."""
        return self.file.rsplit("/", 1)[-1] if self.file else self.repo


def pull_target(repo: str, file: str = "", revision: str = "") -> PullTarget:
    """The request checked; InvalidRequest names the bad field."""
    repo, file = repo.strip(), file.strip().lstrip("/")
    if not repo:
        raise InvalidRequest("field required: a Hub repo id such as ORG/NAME", field="repo")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise InvalidRequest(str(exc).split("\n")[0], field="repo") from None
    if file and (".." in file.split("/") or "\\" in file):
        raise InvalidRequest(f"{file!r} is not a file path inside the repo", field="file")
    return PullTarget(repo, file, revision.strip() or DEFAULT_REVISION)


def start_pull(
    transfers: Transfers,
    catalog: Catalog,
    cache_dir: Path | None,
    repo: str,
    file: str = "",
    revision: str = "",
) -> Transfer:
    """Start pulling (or join the running pull of the same target); its record now.

    Raises InvalidRequest for a malformed request and Unavailable when this
    node may not use the network (`HF_HUB_OFFLINE`); everything the Hub says
    ends up in the transfer's error instead.
    """
    target = pull_target(repo, file, revision)
    if constants.is_offline_mode():
        raise Unavailable(
            "this node runs with HF_HUB_OFFLINE set: it cannot download from the Hub "
            "(restart it without HF_HUB_OFFLINE)"
        )
    running = transfers.running(target.key)
    if running is not None:
        return running.record
    job = transfers.start("pull", target.model, target.key, key=target.key)
    # The catalog's rule for where the cache is, so it scans where the pull writes.
    cache = cache_dir if cache_dir is not None else default_hf_cache()
    pull = Pull(target, cache.expanduser(), hub_endpoint(), job, catalog)
    threading.Thread(target=pull.run, name=f"pull {target.key}", daemon=True).start()
    return job.record


class _Sink:
    """The `.incomplete` file as `http_get` writes it, reporting each chunk's progress."""

    def __init__(self, f: BinaryIO, on_write: Callable[[int], None]) -> None:
        self._f = f
        self._on_write = on_write

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        # Flushed so the size on disk (what a resume starts from) is what was reported.
        self._f.flush()
        self._on_write(self._f.tell())
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: int | None = None) -> int:
        return self._f.truncate(size)


class Pull:
    """One pull's work, on its worker thread."""

    def __init__(
        self,
        target: PullTarget,
        cache_dir: Path,
        endpoint: str | None,
        job: TransferJob,
        catalog: Catalog,
    ) -> None:
        self.target = target
        self.cache_dir = cache_dir
        self.endpoint = endpoint
        self.job = job
        self.catalog = catalog
        self.storage = cache_dir / repo_folder_name(repo_id=target.repo, repo_type="model")
        # Bytes of the files finished so far, and the total once known.
        self._completed = 0
        self._total = 0

    # ---------- the one boundary: every failure becomes the transfer's error ----------

    def run(self) -> None:
        """Download, link, rescan; end the job done or failed (never left running)."""
        t0 = time.monotonic()
        try:
            path, model = self._pull()
        except PullError as exc:
            self._fail(str(exc))
        except (
            HfHubHTTPError,
            EntryNotFoundError,
            httpx2.HTTPError,
            OfflineModeIsEnabled,
            OSError,
        ) as exc:
            self._fail(self.describe(exc))
        except Exception as exc:
            # A bug: logged with its traceback; the job must still end, or a CLI
            # polling it would wait forever.
            log.exception("pull %s failed", self.target.key)
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
        else:
            seconds = time.monotonic() - t0
            log.info(
                "pulled %s into %s (%.0f MB in %.1fs)",
                self.target.key,
                path,
                self._completed / 1e6,
                seconds,
            )
            if model not in self.catalog.entries():
                log.warning("pulled %s, but the catalog does not list it as a model", path)
            self.job.done(str(path), model)

    def _fail(self, message: str) -> None:
        log.warning("pull %s failed: %s", self.target.key, message)
        self.job.fail(message)

    def describe(self, exc: BaseException) -> str:
        """A huggingface_hub / network / disk error, said for the person who asked."""
        t = self.target
        where = self.endpoint or constants.ENDPOINT
        if isinstance(exc, GatedRepoError):
            return (
                f"{t.repo} is gated: accept its terms on the Hub, then give this node a token "
                "with access (HF_TOKEN, or `hf auth login` as the user the node runs as)"
            )
        if isinstance(exc, RepositoryNotFoundError):
            return (
                f"repository {t.repo!r} not found on {where} (or it is private and this node's "
                "token, HF_TOKEN, has no access)"
            )
        if isinstance(exc, RevisionNotFoundError):
            return f"{t.repo} has no revision {t.revision!r}"
        if isinstance(exc, EntryNotFoundError):
            return f"{t.repo}@{t.revision} has no file {t.file or '(one of its files)'!r}"
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else "?"
            first = str(exc).strip().split("\n")[0]
            return f"the Hub at {where} answered HTTP {status}: {first}"
        if isinstance(exc, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set on this node: it cannot download"
        if isinstance(exc, httpx2.HTTPError):
            return f"cannot reach the Hub at {where}: {type(exc).__name__}: {exc}"
        assert isinstance(exc, OSError)
        if exc.errno == errno.ENOSPC:
            return (
                f"disk full in {self.cache_dir}: free some space and pull again "
                "(it resumes where it stopped)"
            )
        return f"cannot write the download in {self.cache_dir}: {exc}"

    # ---------- the download ----------

    def report(self, written: int) -> None:
        """Progress: completed files plus `written` bytes of the current one."""
        self.job.progress(self._completed + written, self._total or None)

    def _pull(self) -> tuple[Path, str]:
        """Fetch the planned files; (where they are, the id the catalog serves them as)."""
        t = self.target
        info = HfApi(endpoint=self.endpoint).model_info(
            t.repo, revision=t.revision, files_metadata=True
        )
        commit = info.sha
        if not commit:
            raise PullError(f"the Hub did not say which commit {t.repo}@{t.revision} is")
        sizes = {s.rfilename: s.size for s in info.siblings or ()}
        files, main = self._plan(sizes)
        self._total = sum(sizes.get(f) or 0 for f in files)
        self.job.progress(0, self._total)
        snapshot = self.storage / "snapshots" / commit
        for name in files:
            self._fetch(name, commit, snapshot)
        self._set_ref(commit)
        # Published before the job says done: a client that sees `done` finds the model.
        self.catalog.scan()
        if not main:
            return snapshot, t.repo
        return snapshot / main, main.rsplit("/", 1)[-1]

    def _plan(self, sizes: dict[str, int | None]) -> tuple[list[str], str]:
        """(the files to fetch in order, the one file that names the model or "" for an MLX
        dir). What the catalog would list lands last: an MLX dir's `config.json`, a split
        GGUF's first part."""
        t = self.target
        names = sorted(sizes)
        if t.file:
            if t.file not in sizes:
                ggufs = [n for n in names if n.lower().endswith(".gguf")]
                hint = f"; its GGUF files: {', '.join(ggufs)}" if ggufs else ""
                raise PullError(f"{t.repo}@{t.revision} has no file {t.file!r}{hint}")
            parts = gguf_parts(t.file, names)
            return parts, parts[-1]
        weights = [n for n in names if n.endswith(".safetensors")]
        if LAST_FILE in sizes and weights:
            files = [n for n in names if any(fnmatch.fnmatch(n, p) for p in MLX_PATTERNS)]
            return sorted(files, key=lambda n: n == LAST_FILE), ""
        models = {gguf_parts(n, names)[-1] for n in names if n.lower().endswith(".gguf")}
        if len(models) == 1:
            parts = gguf_parts(models.pop(), names)
            return parts, parts[-1]
        if models:
            raise PullError(
                f"{t.repo} holds {len(models)} GGUF models; choose one with --file: "
                + ", ".join(sorted(models))
            )
        raise PullError(
            f"{t.repo} has no MLX weights (config.json and *.safetensors) and no GGUF file: "
            "nothing a node can serve (use --file to fetch one file anyway)"
        )

    def _fetch(self, name: str, commit: str, snapshot: Path) -> None:
        """One file into the snapshot (already there: nothing to do)."""
        pointer = snapshot / name
        if pointer.exists():
            self._completed += pointer.stat().st_size
            self.report(0)
            return
        url = hf_hub_url(self.target.repo, name, revision=commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, endpoint=self.endpoint)
        if not meta.etag:
            raise PullError(f"the Hub sent no ETag for {name}: is {url} a Hub endpoint?")
        blob = self.storage / "blobs" / meta.etag
        if not blob.exists():
            self._download_blob(url, meta.location, meta.etag, meta.size, blob, name)
        # The blob is complete: huggingface_hub links it into the snapshot (a HEAD, no bytes).
        hf_hub_download(
            self.target.repo,
            name,
            revision=commit,
            cache_dir=self.cache_dir,
            endpoint=self.endpoint,
        )
        self._completed += blob.stat().st_size if blob.exists() else pointer.stat().st_size
        self.report(0)

    def _download_blob(
        self, url: str, location: str, etag: str, size: int | None, blob: Path, name: str
    ) -> None:
        """The blob's bytes via `blobs/<etag>.incomplete`, resumed from what is there."""
        locks = self.cache_dir / ".locks" / self.storage.name
        locks.mkdir(parents=True, exist_ok=True)
        blob.parent.mkdir(parents=True, exist_ok=True)
        # huggingface_hub's own lock for this blob: no other process (or pull) writes it now.
        with WeakFileLock(locks / f"{etag}.lock"):
            if blob.exists():
                return  # another pull finished it while we waited
            partial = blob.with_name(blob.name + ".incomplete")
            have = partial.stat().st_size if partial.exists() else 0
            if size is not None and have > size:
                log.warning("discarding %s: longer than the file (%d > %d)", partial, have, size)
                partial.unlink()
                have = 0
            if have:
                log.info("resuming %s at %d of %s bytes", name, have, size)
                self.report(have)
            headers = build_hf_headers()  # the token from HF_TOKEN / the token file, if any
            if urlparse(location).netloc != urlparse(url).netloc:
                # A signed CDN URL: the Hub's token stays with the Hub (as huggingface_hub does).
                headers.pop("authorization", None)
            with partial.open("r+b" if have else "wb") as f:
                f.seek(have)
                http_get(
                    location,
                    cast(BinaryIO, _Sink(f, self.report)),
                    resume_size=have,
                    headers=headers,
                    expected_size=size,
                    displayed_filename=name,
                )
            if have and _SHA256.fullmatch(etag):
                self._verify(partial, etag, name)
            os.replace(partial, blob)

    def _verify(self, path: Path, sha256: str, name: str) -> None:
        """A resumed file must hash to its LFS id; a bad one is removed (the next pull
        starts over) rather than served."""
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            path.unlink()
            raise PullError(
                f"{name}: the resumed download does not match its sha256; "
                "the partial file was removed, pull again"
            )

    def _set_ref(self, commit: str) -> None:
        """`refs/<revision>` -> `commit` (atomically), as huggingface_hub records it."""
        revision = self.target.revision
        if _COMMIT.fullmatch(revision):
            return  # a commit names itself
        ref = self.storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)
