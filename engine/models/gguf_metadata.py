"""A GGUF file's metadata and tensor names, read without its vocabulary, and the HF config they describe.

transformers' GGUF reader parses every vocabulary and merge string into numpy objects: ~10 CPU
seconds for SmolLM2, on every start. The config needs none of them, so this reader steps over arrays
(keeping their length) and renames keys with transformers' own GGUF -> HF config table.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass

_MAGIC = b"GGUF"
# GGUF value types -> struct format of one scalar (8 = string, 9 = array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFArray:
    """An array value, kept as its length only (vocabularies, merges, token types)."""

    length: int


@dataclass(frozen=True)
class GGUFHeader:
    """Key/value metadata (arrays as GGUFArray) and the names of the tensors in the file."""

    metadata: dict
    tensor_names: tuple[str, ...]


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        self.pos += length
        return bytes(self.buf[self.pos - length:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, length = self.unpack("<I"), self.unpack("<Q")
            if item_kind == _STRING:
                for _ in range(length):
                    skip = self.unpack("<Q")
                    self.pos += skip
            elif item_kind in _SCALARS:
                self.pos += length * struct.calcsize(_SCALARS[item_kind])
            else:
                for _ in range(length):
                    self.value(item_kind)
            return GGUFArray(length)
        if kind not in _SCALARS:
            raise ValueError(f"GGUF value type {kind} is unknown; is the file corrupt?")
        return self.unpack(_SCALARS[kind])


def read_gguf_header(path: str) -> GGUFHeader:
    """Parse the metadata section and tensor infos of the GGUF file at `path` (v2/v3, little-endian)."""
    stat = os.stat(path)
    return _read_gguf_header(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_gguf_header(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cursor = _Cursor(buf)
        if bytes(buf[:4]) != _MAGIC:
            raise ValueError(f"{path!r} is not a GGUF file (bad magic)")
        cursor.pos = 4
        version = cursor.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{path!r}: GGUF version {version} is not supported (2 or 3)")
        num_tensors, num_kv = cursor.unpack("<Q"), cursor.unpack("<Q")
        metadata = {}
        for _ in range(num_kv):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.unpack("<I"))
        names = []
        for _ in range(num_tensors):
            names.append(cursor.string())
            num_dims = cursor.unpack("<I")
            cursor.pos += 8 * num_dims + 4 + 8  # dims, ggml type, data offset
    return GGUFHeader(metadata, tuple(names))


def gguf_hf_config(header: GGUFHeader) -> dict:
    """The HF config.json-style dict for this GGUF, renamed as transformers does."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    meta = header.metadata
    arch = meta["general.architecture"]
    config: dict = {"model_type": arch}
    for suffix, hf_key in GGUF_CONFIG_MAPPING.get(arch, {}).items():
        value = meta.get(f"{arch}.{suffix}")
        if hf_key is not None and value is not None:
            config[hf_key] = value.length if isinstance(value, GGUFArray) else value
    if "vocab_size" not in config and isinstance(meta.get("tokenizer.ggml.tokens"), GGUFArray):
        config["vocab_size"] = meta["tokenizer.ggml.tokens"].length
    # llama.cpp drops the output matrix of tied models.
    config["tie_word_embeddings"] = "output.weight" not in header.tensor_names
    for key in ("bos_token_id", "eos_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = value
    return config
