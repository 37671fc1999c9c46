"""Binary codec for everything Persona stores: msgpack inside a small checked envelope.

Envelope: 2 magic bytes, 1 format-version byte, a CRC32 of the payload (4 bytes,
big endian), then the msgpack payload. The checksum matters: msgpack happily
decodes many corrupt byte strings into *some* value, and a store must never hand
garbage to the profile model. An unknown version or a failed check raises
CorruptRecord.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Any

import msgpack

from persona.errors import CorruptRecord

MAGIC = b"PS"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">2sBI")


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(payload)) + payload


def encode(value: Any) -> bytes:
    return _frame(msgpack.packb(value, use_bin_type=True))


def encoder() -> Callable[[Any], bytes]:
    """``encode`` with one reused msgpack Packer: for encoding many records in a row
    from one thread (a Packer is not thread-safe; packb builds one per call)."""
    pack = msgpack.Packer(use_bin_type=True).pack

    def encode_one(value: Any) -> bytes:
        return _frame(pack(value))

    return encode_one


def decode(blob: bytes, *, what: str = "record") -> Any:
    if len(blob) < _HEADER.size:
        raise CorruptRecord(f"{what}: {len(blob)} bytes is too short to be a Persona record")
    magic, version, checksum = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptRecord(f"{what}: not a Persona record (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise CorruptRecord(
            f"{what}: format version {version} is not supported (this build reads "
            f"version {FORMAT_VERSION}); upgrade Persona or restore the data"
        )
    payload = memoryview(blob)[_HEADER.size :]
    if zlib.crc32(payload) != checksum:
        raise CorruptRecord(f"{what}: checksum mismatch, the stored bytes are corrupt")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:  # pragma: no cover - crc guards this
        raise CorruptRecord(f"{what}: undecodable payload ({exc})") from exc
