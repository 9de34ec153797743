"""Search the Hugging Face Hub for models a node can serve: MLX and GGUF repos.

`search_hub` asks the Hub once per kind (MLX repos carry the library tag
`mlx`, GGUF repos `gguf`), most downloaded first, and merges the answers;
`repo_files` lists one repo's files (which GGUF file to pull, how big). Both
block (huggingface_hub is synchronous): the admin API runs them in a worker
thread. The Hub's errors are mapped here, once, to the mesh error tree: an
unreachable Hub (or HF_HUB_OFFLINE) is Unavailable, a missing repo NOT_FOUND.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx2
from huggingface_hub import HfApi, ModelInfo, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import ExpandModelProperty_T

from mesh.errors import InvalidRequest, MeshError, Unavailable, from_code

KINDS = ("mlx", "gguf")
# What a search result needs, and nothing more (the Hub sends only what is asked for).
_EXPAND: list[ExpandModelProperty_T] = [
    "downloads",
    "likes",
    "lastModified",
    "library_name",
    "tags",
    "usedStorage",
    "safetensors",
    "gguf",
    "siblings",
]
MAX_LIMIT = 100

# llama.cpp's quantization names as GGUF files carry them: Q4_K_M, IQ2_XXS, Q8_0, BF16...
_GGUF_QUANT = re.compile(
    r"(?<![A-Za-z0-9])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32|MXFP4|TQ\d_\d)(?![A-Za-z0-9])",
    re.IGNORECASE,
)
# MLX repos say it in the name: "...-4bit", "...-8bit-DWQ", "...-bf16", "...-mxfp4".
_MLX_BITS = re.compile(r"(?<![0-9])(\d{1,2})[-_ ]?bits?(?![a-z])", re.IGNORECASE)
_MLX_FLOAT = re.compile(r"(?<![a-z0-9])(bf16|fp16|f16|fp32|mxfp4|nvfp4|fp8)(?![a-z0-9])", re.I)
_MLX_METHOD = re.compile(r"(?<![a-z])(dwq|awq|gptq)(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class HubModel:
    """One search result."""

    repo: str
    # mlx | gguf
    kind: str
    downloads: int
    likes: int
    # The repo's storage on the Hub (every file; for a GGUF repo, every quantization).
    size_bytes: int | None
    parameters: int | None
    # "4bit", "bf16", or a GGUF repo's quantizations ("Q4_K_M, Q8_0").
    quantization: str
    # ISO 8601, "" when the Hub did not say.
    updated: str
    # A GGUF repo's .gguf files (what `--file` takes).
    gguf_files: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "kind": self.kind,
            "downloads": self.downloads,
            "likes": self.likes,
            "size_bytes": self.size_bytes,
            "parameters": self.parameters,
            "quantization": self.quantization,
            "updated": self.updated or None,
            "gguf_files": list(self.gguf_files),
        }


def hub_endpoint() -> str | None:
    """`HF_ENDPOINT` as set now (None: huggingface_hub's default, read at its import)."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None


def gguf_quantization(filename: str) -> str:
    """The quantization a GGUF file name carries ("" if none), upper case."""
    stem = filename.rsplit("/", 1)[-1]
    stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    found = _GGUF_QUANT.findall(stem)
    return found[-1].upper() if found else ""


def mlx_quantization(repo: str, tags: list[str] | None = None) -> str:
    """ "4bit", "8bit-DWQ", "bf16"... from an MLX repo's name (then its tags); "" if none."""
    for text in (repo.rsplit("/", 1)[-1], " ".join(tags or ())):
        bits = _MLX_BITS.search(text)
        method = _MLX_METHOD.search(text)
        if bits:
            q = f"{int(bits.group(1))}bit"
            return f"{q}-{method.group(1).upper()}" if method else q
        floats = _MLX_FLOAT.search(text)
        if floats:
            return floats.group(1).lower()
    return ""


def _mapped(exc: BaseException, what: str) -> MeshError:
    """A huggingface_hub or network error as a mesh error (the one place that decides)."""
    where = hub_endpoint() or constants.ENDPOINT
    if isinstance(exc, RepositoryNotFoundError):
        return from_code("NOT_FOUND", f"{what}: not found on {where} (or private)")
    if isinstance(exc, RevisionNotFoundError):
        return from_code("NOT_FOUND", f"{what}: no such revision on {where}")
    if isinstance(exc, OfflineModeIsEnabled):
        return Unavailable(f"HF_HUB_OFFLINE is set on this coordinator: cannot search {where}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        first = str(exc).strip().split("\n")[0]
        return Unavailable(f"the Hub at {where} answered HTTP {status}: {first}")
    return Unavailable(f"cannot reach the Hub at {where}: {type(exc).__name__}: {exc}")


_HUB_ERRORS = (HfHubHTTPError, OfflineModeIsEnabled, httpx2.HTTPError)


def _result(info: ModelInfo, kind: str) -> HubModel:
    """A huggingface_hub ModelInfo as a search result."""
    files = [s.rfilename for s in info.siblings or ()]
    ggufs = tuple(f for f in files if f.lower().endswith(".gguf"))
    if kind == "gguf":
        quants = dict.fromkeys(q for f in ggufs if (q := gguf_quantization(f)))
        quantization = ", ".join(quants)
    else:
        quantization = mlx_quantization(info.id, info.tags)
    parameters = None
    if info.safetensors is not None:
        parameters = info.safetensors.total
    elif isinstance(info.gguf, dict) and isinstance(info.gguf.get("total"), int):
        parameters = info.gguf["total"]
    updated: datetime | None = info.last_modified
    return HubModel(
        repo=info.id,
        kind=kind,
        downloads=info.downloads or 0,
        likes=info.likes or 0,
        size_bytes=info.used_storage,
        parameters=parameters,
        quantization=quantization,
        updated=updated.isoformat() if updated else "",
        gguf_files=ggufs if kind == "gguf" else (),
    )


def search_hub(text: str, *, kinds: tuple[str, ...] = KINDS, limit: int = 20) -> list[HubModel]:
    """Repos matching `text` of the given kinds, most downloaded first (blocking).

    Raises Unavailable when the Hub cannot be reached or refuses.
    """
    limit = max(1, min(limit, MAX_LIMIT))
    api = HfApi(endpoint=hub_endpoint())
    seen: dict[str, HubModel] = {}
    try:
        for kind in kinds:
            for info in api.list_models(
                search=text or None, filter=kind, sort="downloads", limit=limit, expand=_EXPAND
            ):
                seen.setdefault(info.id, _result(info, kind))
    except _HUB_ERRORS as exc:
        raise _mapped(exc, f"search {text!r}") from None
    ranked = sorted(seen.values(), key=lambda m: (-m.downloads, m.repo))
    return ranked[:limit]


def repo_files(repo: str, revision: str = "") -> dict[str, Any]:
    """One repo's files with sizes and (for GGUF files) quantization (blocking).

    Raises InvalidRequest for a malformed repo id, NOT_FOUND for a missing repo
    or revision, Unavailable when the Hub cannot be reached.
    """
    api = HfApi(endpoint=hub_endpoint())
    try:
        info = api.model_info(repo, revision=revision or None, files_metadata=True)
    except HFValidationError as exc:
        raise InvalidRequest(str(exc).split("\n")[0], field="repo") from None
    except _HUB_ERRORS as exc:
        raise _mapped(exc, f"{repo}@{revision}" if revision else repo) from None
    files = [
        {"name": s.rfilename, "size_bytes": s.size, "quantization": gguf_quantization(s.rfilename)}
        if s.rfilename.lower().endswith(".gguf")
        else {"name": s.rfilename, "size_bytes": s.size}
        for s in info.siblings or ()
    ]
    names = {f["name"] for f in files}
    mlx = "config.json" in names and any(str(n).endswith(".safetensors") for n in names)
    return {
        "repo": info.id,
        "revision": revision or "main",
        "sha": info.sha,
        "kind": "mlx" if mlx else "gguf" if any(str(n).endswith(".gguf") for n in names) else "",
        "files": files,
    }
