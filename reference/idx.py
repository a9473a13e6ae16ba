"""Read and write IDX files, the format MNIST and Fashion-MNIST are distributed in.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian 32-bit size per dimension, then the values in C order. Only the two kinds the datasets
use are supported: unsigned-byte images, magic ``0x00000803`` (count x rows x cols), and
unsigned-byte labels, magic ``0x00000801`` (count). Either may be gzip-compressed.

Anything malformed raises :class:`IdxError` with a message that names the file and says what is
wrong, because these files come from outside (a user's directory, a download, a Debian package)
and a bare numpy reshape error would not tell anyone which file to replace.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from reference import atomic

__all__ = ["IdxError", "IdxKind", "encode_idx", "parse_idx", "read_idx", "write_idx"]

IdxKind = Literal["images", "labels"]

_UBYTE = 0x08
_NDIM: dict[IdxKind, int] = {"images": 3, "labels": 1}
_KIND_OF_NDIM: dict[int, IdxKind] = {ndim: kind for kind, ndim in _NDIM.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(ValueError):
    """A file is not a well-formed IDX file of the expected kind."""


def _magic(ndim: int) -> int:
    return (_UBYTE << 8) | ndim


def _describe(dims: tuple[int, ...]) -> str:
    if len(dims) == 1:
        return f"{dims[0]:,} labels"
    return f"{dims[0]:,} images of {'x'.join(str(d) for d in dims[1:])} pixels"


def parse_idx(data: bytes, name: str = "<bytes>", kind: IdxKind | None = None) -> np.ndarray:
    """Decode the (uncompressed) bytes of an IDX file; ``name`` is used in error messages.

    ``kind`` ("images" or "labels"), when given, is checked against the magic number.
    Returns a writable ``uint8`` array of shape (count, rows, cols) or (count,).
    """
    if len(data) < 4:
        raise IdxError(f"{name}: not an IDX file: {len(data)} bytes, too short for the 4-byte magic number")
    magic = int.from_bytes(data[:4], "big")
    ndim = data[3]
    if data[:2] != b"\0\0" or data[2] != _UBYTE or ndim not in _KIND_OF_NDIM:
        raise IdxError(
            f"{name}: not an IDX file of unsigned bytes: magic number 0x{magic:08x}, expected "
            f"0x{_magic(3):08x} (images) or 0x{_magic(1):08x} (labels)"
        )
    found = _KIND_OF_NDIM[ndim]
    if kind is not None and found != kind:
        raise IdxError(
            f"{name}: magic number 0x{magic:08x} marks a {found} file, expected {kind} "
            f"(0x{_magic(_NDIM[kind]):08x})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{name}: truncated in the header: {len(data)} bytes, the {found} header needs {header}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) < expected:
        raise IdxError(
            f"{name}: truncated: the header declares {_describe(dims)} ({expected:,} bytes), "
            f"but the file has {len(data):,} bytes"
        )
    if len(data) > expected:
        raise IdxError(
            f"{name}: {len(data) - expected:,} unexpected bytes after the {_describe(dims)} the header "
            f"declares (file has {len(data):,} bytes, expected {expected:,})"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: str | os.PathLike[str], kind: IdxKind | None = None) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not, validating it completely.

    Raises :class:`IdxError` for a malformed file (``OSError`` only if it cannot be read at all).
    """
    path = Path(path)
    data = path.read_bytes()
    # Sniff the content as well as the suffix: torchvision's own names drop ".gz" after extracting,
    # and an IDX file never starts with the gzip magic (its first two bytes are zero).
    if path.suffix == ".gz" or data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise IdxError(f"{path}: not a valid gzip file: {exc}") from None
    return parse_idx(data, str(path), kind)


def encode_idx(array: np.ndarray) -> bytes:
    """The bytes of the (uncompressed) IDX file of a ``uint8`` array of 1 (labels) or 3 (images) dims."""
    array = np.asarray(array)
    # No silent casting: float pixels in 0..1 or labels above 255 would be wrapped, not rejected.
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx writes unsigned bytes; got dtype {array.dtype} (convert it explicitly)")
    if array.ndim not in _KIND_OF_NDIM:
        raise ValueError(f"write_idx writes images (3 dims) or labels (1 dim); got shape {array.shape}")
    return struct.pack(f">I{array.ndim}I", _magic(array.ndim), *array.shape) + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a ``uint8`` array of 1 (labels) or 3 (images) dimensions as an IDX file.

    A ``.gz`` suffix writes it gzip-compressed (with a zero timestamp, so the bytes are
    reproducible). The file is replaced atomically, so a reader never sees half of it.
    """
    path = Path(path)
    data = encode_idx(array)
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    atomic.write(path, data)
