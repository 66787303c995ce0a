"""A disk cache of dequantized GGUF models, so only the first start pays for conversion.

Dequantizing a GGUF file and rebuilding its tokenizer from the vocabulary in its metadata take
tens of seconds even for SmolLM2; the result is the same every time. It is kept, keyed by the
file's revision digest and the dtype, as plain safetensors plus tokenizer files under
`$TIERKV_CACHE_DIR` (default `~/.cache/tierkv`). A half-written entry is never used: files are
written to a temporary directory that is renamed into place when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("TIERKV_CACHE_DIR", Path.home() / ".cache" / "tierkv"))


def entry_dir(revision: str, what: str) -> Path:
    return cache_root() / "gguf" / revision[:32] / what


def lookup(revision: str, what: str) -> Path | None:
    """The cached directory for (`revision`, `what`) if a complete one exists."""
    path = entry_dir(revision, what)
    return path if path.is_dir() else None


def store(revision: str, what: str, write) -> Path | None:
    """Write an entry with `write(tmp_dir)`; returns its directory, or None if the cache is unwritable."""
    final = entry_dir(revision, what)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{what}-"))
    except OSError as e:
        logger.warning("GGUF cache at %s is not writable (%s); converting on every start", final.parent, e)
        return None
    try:
        write(tmp)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():  # another process may have won the race with the same content
            logger.warning("could not write the GGUF cache entry %s", final, exc_info=True)
            return None
    return final
