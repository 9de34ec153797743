"""A small pure-Python GGUF header reader.

Reads the key/value metadata and the tensor directory of a GGUF file (versions
2 and 3, little-endian) without touching tensor data, so callers can decide
whether a file is usable before loading gigabytes of weights.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
magic "GGUF", u32 version, u64 tensor count, u64 kv count, kv pairs, tensor
infos (name, u32 n_dims, u64 dims[n_dims] innermost first, u32 ggml type,
u64 offset), padding to `general.alignment`, tensor data.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeAlias

from mesh.errors import InvalidRequest

GGUFValue: TypeAlias = int | float | bool | str | list["GGUFValue"]

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml type id -> (name, elements per block, bytes per block); ids and sizes as in
# gguf-py's GGMLQuantizationType / GGML_QUANT_SIZES.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# GGUF metadata value types: id -> struct format of a scalar (8 = string, 9 = array).
_SCALARS: dict[int, str] = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class GGUFImportError(InvalidRequest):
    """A GGUF file cannot be imported: unsupported content, or unreadable."""


class GGUFFormatError(GGUFImportError):
    """The file is not a GGUF file this reader understands (or is truncated)."""


def ggml_type_name(type_id: int) -> str:
    """Name of a ggml tensor type id ("Q4_K"), or "type_<id>" when unknown."""
    known = GGML_TYPES.get(type_id)
    return known[0] if known else f"type_{type_id}"


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory.

    `shape` is in row-major (numpy/MLX) order, i.e. GGUF's dims reversed;
    `offset` is absolute in the file.
    """

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.type_id)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int | None:
        """Size of the tensor's data, or None for an unknown type."""
        known = GGML_TYPES.get(self.type_id)
        if known is None:
            return None
        _, block, size = known
        return self.n_elements // block * size


@dataclass(frozen=True)
class GGUFHeader:
    """Everything before the tensor data of a GGUF file."""

    path: Path
    version: int
    metadata: dict[str, GGUFValue]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int
    file_size: int

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else ""

    def type_counts(self) -> dict[str, int]:
        """Number of tensors per ggml type name, most frequent first."""
        return dict(Counter(t.type_name for t in self.tensors).most_common())


class _Reader:
    """Sequential little-endian reads over a buffered file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def read(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise GGUFFormatError("unexpected end of file in the GGUF header")
        return data

    def scalar(self, fmt: str) -> int | float | bool:
        size = struct.calcsize("<" + fmt)
        value: int | float | bool = struct.unpack("<" + fmt, self.read(size))[0]
        return value

    def u32(self) -> int:
        return int(self.scalar("I"))

    def u64(self) -> int:
        return int(self.scalar("Q"))

    def string(self) -> str:
        return self.read(self.u64()).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> GGUFValue:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.u32(), self.u64()
            if etype in _SCALARS:
                # One unpack for the whole array: token_type arrays hold ~100k items.
                fmt = f"<{count}{_SCALARS[etype]}"
                return list(struct.unpack(fmt, self.read(struct.calcsize(fmt))))
            return [self.value(etype) for _ in range(count)]
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        raise GGUFFormatError(f"unknown GGUF metadata value type {vtype}")


def read_header(path: Path) -> GGUFHeader:
    """Read the metadata and tensor directory of the GGUF file at `path`.

    Raises GGUFFormatError when the file is not GGUF v2/v3 little-endian, is
    truncated, or a tensor's data would lie past the end of the file.
    """
    file_size = path.stat().st_size
    with path.open("rb") as f:
        r = _Reader(f)
        if r.read(4) != MAGIC:
            raise GGUFFormatError(f"{path.name} is not a GGUF file (bad magic)")
        version = r.u32()
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in (2, 3):
                raise GGUFFormatError(f"{path.name} is a big-endian GGUF; not supported")
            raise GGUFFormatError(f"{path.name}: unsupported GGUF version {version}")
        n_tensors, n_kv = r.u64(), r.u64()
        metadata: dict[str, GGUFValue] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.u32())
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = r.string()
            dims = tuple(r.u64() for _ in range(r.u32()))
            raw.append((name, tuple(reversed(dims)), r.u32(), r.u64()))
        header_end = f.tell()

    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    alignment = align if isinstance(align, int) and align > 0 else DEFAULT_ALIGNMENT
    data_offset = -(-header_end // alignment) * alignment
    tensors = tuple(TensorInfo(n, s, t, data_offset + o) for n, s, t, o in raw)
    for t in tensors:
        size = t.nbytes
        if size is not None and t.offset + size > file_size:
            raise GGUFFormatError(f"{path.name} is truncated: tensor {t.name!r} lies past the end")
    return GGUFHeader(path, version, metadata, tensors, alignment, data_offset, file_size)
