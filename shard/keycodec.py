"""Row encoding in the `data` column family.

Version key = enc(key) + be64(2**64-1 - ts). `enc` is memcomparable: every 0x00 byte
becomes 0x00 0xFF and the key ends with 0x00 0x01, so encoded keys sort like the user
keys and no key's encoding is a prefix of another's. The inverted ts puts a key's newest
version first, so a seek to version_key(key, S) lands on the newest version at or below S.

Value row = b"\\x01" + value, or b"\\x00" for a tombstone (a delete is a version too, so a
deleted key never resurfaces from an older version after a flush or restore).
"""
import struct

MAX_TS = 2**64 - 1
TERMINATOR = b"\x00\x01"
TS_BYTES = 8
TOMBSTONE = b"\x00"
LIVE_TAG = b"\x01"

_be64 = struct.Struct(">Q")
_pack_ts = _be64.pack
_unpack_ts = _be64.unpack_from


def enc(key: bytes) -> bytes:
    """Memcomparable encoding of a user key (the prefix shared by all its versions)."""
    return key.replace(b"\x00", b"\x00\xff") + TERMINATOR


def dec(encoded: bytes) -> bytes:
    """Inverse of enc; anything after the terminator (a version suffix) is ignored."""
    i = 0
    while True:
        j = encoded.find(b"\x00", i)
        if j < 0:
            raise ValueError("not an encoded key: no terminator")
        marker = encoded[j + 1:j + 2]
        if marker == b"\x01":
            return encoded[:j].replace(b"\x00\xff", b"\x00")
        if marker != b"\xff":
            raise ValueError("not an encoded key: bad escape")
        i = j + 2


def version_key(key: bytes, ts: int) -> bytes:
    return key.replace(b"\x00", b"\x00\xff") + TERMINATOR + _pack_ts(MAX_TS - ts)


version_suffix_packer = _pack_ts    # version_suffix(ts) == version_suffix_packer(MAX_TS - ts)


def version_suffix(ts: int) -> bytes:
    return _pack_ts(MAX_TS - ts)


def split_version_key(vkey: bytes) -> tuple[bytes, int]:
    """version key -> (user key, ts)."""
    return dec(vkey[:-TS_BYTES]), MAX_TS - _unpack_ts(vkey, len(vkey) - TS_BYTES)[0]


def ts_of(vkey: bytes) -> int:
    return MAX_TS - _unpack_ts(vkey, len(vkey) - TS_BYTES)[0]


def tag(value: bytes | None) -> bytes:
    return TOMBSTONE if value is None else LIVE_TAG + value


def untag(row: bytes) -> bytes | None:
    if row[:1] == LIVE_TAG:
        return row[1:]
    if row == TOMBSTONE:
        return None
    raise ValueError(f"bad value row tag {row[:1]!r}")


def prefix_end(prefix: bytes) -> bytes | None:
    """Smallest key greater than every key starting with prefix (None: unbounded)."""
    p = prefix.rstrip(b"\xff")
    return p[:-1] + bytes([p[-1] + 1]) if p else None


def be64(n: int) -> bytes:
    """Fixed-width big-endian int: log sequence numbers sort numerically."""
    return _pack_ts(n)


def from_be64(b: bytes) -> int:
    return _unpack_ts(b)[0]
