"""TensorBoard scalars without TensorFlow: a small event-file writer and reader.

    writer = SummaryWriter("DIR/<stage>/tensorboard")
    writer.scalar("loss", 2.31, step=100)
    writer.close()

An event file is a sequence of TFRecords, each

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little-endian), where `data` is a serialized `tensorflow.Event` protobuf. Only
the fields scalars need are encoded, by hand:

    Event   { double wall_time = 1; int64 step = 2;
              oneof { string file_version = 3; Summary summary = 5; } }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

The first record of a file carries file_version "brain.Event:2", which is how
TensorBoard recognises the format. `read_events` / `read_scalars` decode the same
subset (and check both CRCs), for tests and for reading a run without TensorBoard.
"""

from __future__ import annotations

import glob
import os
import socket
import struct
import time

FILE_VERSION = "brain.Event:2"

# --- CRC-32C (Castagnoli), as TFRecord frames use it ---------------------------------

_CASTAGNOLI = 0x82F63B78  # the polynomial 0x1EDC6F41, bit-reflected


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CASTAGNOLI if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (reflected; init and final xor 0xFFFFFFFF).

    crc32c(b"123456789") == 0xE3069283, the standard check value."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The TFRecord mask: rotate right by 15 and add a constant, so that a CRC of
    data that itself holds CRCs does not degenerate."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


# --- protobuf wire format (the few field kinds an Event needs) -----------------------

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_FLOAT32_MAX = 3.4028234663852886e38


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 is ten bytes of two's complement, as protobuf does
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    # struct refuses finite doubles beyond float32's range; a cast makes them inf.
    if abs(value) > _FLOAT32_MAX and value == value:
        value = float("inf") if value > 0 else float("-inf")
    return struct.pack("<f", value)


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    """Serialized Event with either a file_version or a Summary of simple_value scalars."""
    out = _key(1, _FIXED64) + struct.pack("<d", wall_time) + _key(2, _VARINT) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, _FIXED32) + _float32(value))
            for tag, value in scalars.items())
        out += _bytes_field(5, summary)
    return out


def _fields(buf: bytes):
    """Yields (field number, wire type, value) of one message: ints for varint and
    fixed fields (raw little-endian bytes for fixed ones), bytes for length-delimited."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, i = _read_varint(buf, i)
        elif wire == _FIXED64:
            value, i = buf[i:i + 8], i + 8
        elif wire == _FIXED32:
            value, i = buf[i:i + 4], i + 4
        elif wire == _BYTES:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {field})")
        if i > len(buf):
            raise ValueError("protobuf message ends inside a field")
        yield field, wire, value


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n, shift = 0, 0
    while True:
        if i >= len(buf):
            raise ValueError("protobuf message ends inside a varint")
        b = buf[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return n, i


def decode_event(data: bytes) -> dict:
    """{"wall_time", "step", "file_version"?, "scalars"?: {tag: value}} of one Event."""
    event: dict = {"wall_time": 0.0, "step": 0}
    for field, _, value in _fields(data):
        if field == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 3:
            event["file_version"] = value.decode()
        elif field == 5:
            scalars = event.setdefault("scalars", {})
            for f, _, v in _fields(value):
                if f != 1:
                    continue
                tag, simple = None, None
                for vf, _, vv in _fields(v):
                    if vf == 1:
                        tag = vv.decode()
                    elif vf == 2:
                        simple = struct.unpack("<f", vv)[0]
                if tag is not None and simple is not None:
                    scalars[tag] = simple
    return event


# --- files ----------------------------------------------------------------------------

def read_records(path: str) -> list[bytes]:
    """Every TFRecord payload of a file, both CRCs checked. A truncated final record
    (a writer killed mid-write) is dropped; a bad CRC before that is an error."""
    with open(path, "rb") as f:
        raw = f.read()
    records, i = [], 0
    while i < len(raw):
        if i + 12 > len(raw):
            break  # torn header at the end
        length_bytes = raw[i:i + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", raw[i + 8:i + 12])
        if length_crc != masked_crc32c(length_bytes):
            raise ValueError(f"{path}: bad length CRC in the record at byte {i}")
        end = i + 12 + length + 4
        if end > len(raw):
            break  # torn record at the end
        data = raw[i + 12:i + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[end - 4:end])
        if data_crc != masked_crc32c(data):
            raise ValueError(f"{path}: bad data CRC in the record at byte {i}")
        records.append(data)
        i = end
    return records


def read_events(path: str) -> list[dict]:
    """The decoded Events of one event file, in order (see `decode_event`)."""
    return [decode_event(r) for r in read_records(path)]


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} over every event file in `logdir`, in file-name
    (= creation time) order then write order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in read_events(path):
            for tag, value in event.get("scalars", {}).items():
                out.setdefault(tag, []).append((event["step"], value))
    return out


class SummaryWriter:
    """Appends scalar Events to `logdir/events.out.tfevents.<time>.<hostname>`.

    A new writer opens a new file (TensorBoard merges all files of a directory), so
    a resumed stage adds a file beside the first run's rather than rewriting it.
    """

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        base = os.path.join(logdir, name)
        path, n = base, 0
        while os.path.exists(path):  # two writers in the same second must not share a file
            n += 1
            path = f"{base}.{n}"
        self.path = path
        self._file = open(path, "wb")
        self._file.write(frame(encode_event(time.time(), 0, file_version=FILE_VERSION)))
        self._file.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Records `value` (stored as float32, as TensorBoard does) for `tag` at `step`."""
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tensorboard tag must be a non-empty string, got {tag!r}")
        if self._file is None:
            raise ValueError(f"SummaryWriter for {self.path} is closed")
        self._file.write(frame(encode_event(time.time(), int(step), scalars={tag: float(value)})))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "SummaryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
