"""Frame codec: a 4-byte big-endian length prefix, then a msgpack body.

The body is the list ``[version, type_tag, field_1, field_2, ...]`` with the
fields in the dataclass's declaration order. Entries travel as
``[index, view, kind, payload]`` and headers as ``[name, value]`` pairs. Every
decoded value is checked against the field's declared type and bounds, and
any defect surfaces as ``ProtocolError`` and nothing else: a peer sending
garbage costs one connection, never the node. The msgpack decode itself is
bounded (``unpack_bounded``): no container, string or total past what the
largest legitimate message holds is built.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import msgpack

from protocol.errors import ProtocolError
from protocol.membership import MAX_MEMBERS, is_member_id
from protocol.messages import MESSAGE_REGISTRY, MESSAGE_TYPES, Message, ReplicatedSettings
from protocol.types import MAX_ENTRIES_PER_MESSAGE, Entry, EntryKind

PROTOCOL_VERSION = 1
LENGTH_PREFIX_BYTES = 4
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_INTEGER = 2**63 - 1
MAX_TEXT_CHARS = 65_536
MAX_HEADER_PAIRS = 256
# A heartbeat's floors: one per member of a configuration (a primary keeps none for former members).
MAX_FLOOR_PAIRS = MAX_MEMBERS
# Entries one AppendEntries may carry: 4x the 256 a replica batches by default; ReplicaConfig refuses a
# max_entries_per_message above it, since every receiver refuses a larger batch.
MAX_ENTRIES_PER_FRAME = MAX_ENTRIES_PER_MESSAGE
# A Hello's settings: a few named integers (one today), so that a Hello stays well under the handshake's
# 1 KiB frame bound (tokenvault/core/transport.py) with every one of them at its longest.
MAX_SETTINGS = 8
SETTING_NAME = re.compile(r"[a-z][a-z0-9_.]{0,47}\Z")


# --------------------------------------------------------------------------- bounded msgpack


def unpack_bounded(data: bytes, *, max_elements: int, max_array_len: int, max_map_len: int, max_str_len: int,
                   max_bin_len: int) -> Any:
    """``msgpack.unpackb`` for hostile bytes: each container, each string and the whole are bounded.

    msgpack's own limits refuse an array, map, string or byte string whose
    header is over its bound before anything is allocated for it, but they bound
    each container alone: a frame of nested empty arrays (``[[[], ...], ...]``)
    passes them and costs about 64 bytes of memory a byte of frame. So every
    container, as msgpack completes it, also counts itself and its members (a
    map's keys and values) against ``max_elements``, and the decode stops at
    the first one past it. What this leaves to msgpack is what it holds in
    containers it has not completed yet: at most 1,023 nested ones (its stack),
    each an array of at most ``max_array_len`` members, of which msgpack 1.2
    preallocates at most 10,000 whatever the header claims (8 bytes each: under
    80 MiB for the whole stack, one decode at a time on a loop), or a map.
    Extension types are refused. Raises what msgpack raises: ValueError (and its subclasses) or
    msgpack.UnpackException.
    """
    left = max_elements

    def counted_list(items: list[Any]) -> list[Any]:
        nonlocal left
        left -= 1 + len(items)
        if left < 0:
            raise ValueError(f"more than {max_elements} msgpack elements")
        return items

    def counted_map(pairs: dict[Any, Any]) -> dict[Any, Any]:
        nonlocal left
        left -= 1 + 2 * len(pairs)
        if left < 0:
            raise ValueError(f"more than {max_elements} msgpack elements")
        return pairs

    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, list_hook=counted_list,
                           object_hook=counted_map, max_array_len=max_array_len, max_map_len=max_map_len,
                           max_str_len=max_str_len, max_bin_len=max_bin_len, max_ext_len=0)


# --------------------------------------------------------------------------- per-field codecs


def _check_integer(value: Any) -> int:
    # bool is a subclass of int in Python; a boolean where a number belongs is garbage.
    if type(value) is not int or value < 0 or value > MAX_INTEGER:
        raise ProtocolError("expected a non-negative 64-bit integer")
    return value


def _check_boolean(value: Any) -> bool:
    if type(value) is not bool:
        raise ProtocolError("expected a boolean")
    return value


def _check_text(value: Any) -> str:
    if type(value) is not str or len(value) > MAX_TEXT_CHARS:
        raise ProtocolError("expected a bounded text string")
    return value


def _check_bytes(value: Any) -> bytes:
    if type(value) is not bytes:
        raise ProtocolError("expected a byte string")
    return value


_ENTRY_KINDS = {int(kind): kind for kind in EntryKind}


def _decode_entries(value: Any) -> tuple[Entry, ...]:
    if type(value) is not list:
        raise ProtocolError("expected a list of entries")
    entries: list[Entry] = []
    append = entries.append
    kinds = _ENTRY_KINDS
    # Inlined checks: this loop runs once per replicated entry, so it is kept lean.
    for item in value:
        if type(item) is not list or len(item) != 4:
            raise ProtocolError("an entry must be a list of four fields")
        index, view, kind_number, payload = item
        if (type(index) is not int or type(view) is not int or not 0 <= index <= MAX_INTEGER
                or not 0 <= view <= MAX_INTEGER or type(payload) is not bytes):
            raise ProtocolError("malformed entry fields")
        kind = kinds.get(kind_number) if type(kind_number) is int else None
        if kind is None:
            raise ProtocolError("unknown entry kind")
        append(Entry(index, view, kind, payload))
    return tuple(entries)


def _encode_entries(entries: tuple[Entry, ...]) -> list[list[Any]]:
    return [[entry.index, entry.view, int(entry.kind), entry.payload] for entry in entries]


def _decode_pairs(value: Any, bound: int, what: str, first: Callable[[Any], Any],
                  second: Callable[[Any], Any]) -> tuple[tuple[Any, Any], ...]:
    """A list of at most ``bound`` two-item lists, each item checked by its decoder."""
    if type(value) is not list or len(value) > bound:
        raise ProtocolError(f"expected a bounded list of {what}s")
    pairs = []
    for item in value:
        if type(item) is not list or len(item) != 2:
            raise ProtocolError(f"a {what} must be a pair")
        pairs.append((first(item[0]), second(item[1])))
    return tuple(pairs)


def _encode_pairs(pairs: tuple[tuple[Any, Any], ...]) -> list[list[Any]]:
    return [[first, second] for first, second in pairs]


def _decode_headers(value: Any) -> tuple[tuple[str, str], ...]:
    return _decode_pairs(value, MAX_HEADER_PAIRS, "header", _check_text, _check_text)


def _check_member_id(value: Any) -> str:
    if not is_member_id(value):
        raise ProtocolError("expected a member id")
    member: str = value
    return member


def _decode_floors(value: Any) -> tuple[tuple[str, int], ...]:
    return _decode_pairs(value, MAX_FLOOR_PAIRS, "member floor", _check_member_id, _check_integer)


def _check_setting_name(value: Any) -> str:
    if type(value) is not str or SETTING_NAME.match(value) is None:
        raise ProtocolError("expected a setting name")
    name: str = value
    return name


def decode_settings(value: Any) -> ReplicatedSettings:
    """A Hello's settings: at most MAX_SETTINGS [name, value] pairs, sorted by name, each name once (the form
    the handshake proof covers, so that two equal sets of settings are equal pairs)."""
    settings: ReplicatedSettings = _decode_pairs(value, MAX_SETTINGS, "setting", _check_setting_name,
                                                 _check_integer)
    names = [name for name, _ in settings]
    if names != sorted(set(names)):
        raise ProtocolError("settings must be sorted by name, each name once")
    return settings


def _identity(value: Any) -> Any:
    return value


# Field annotation (as written in messages.py) -> (encode, decode).
_FIELD_CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "int": (_identity, _check_integer),
    "bool": (_identity, _check_boolean),
    "str": (_identity, _check_text),
    "bytes": (_identity, _check_bytes),
    "tuple[Entry, ...]": (_encode_entries, _decode_entries),
    "tuple[tuple[str, str], ...]": (_encode_pairs, _decode_headers),
    "tuple[tuple[str, int], ...]": (_encode_pairs, _decode_floors),
    "ReplicatedSettings": (_encode_pairs, decode_settings),
}


@dataclasses.dataclass(frozen=True, slots=True)
class _MessageLayout:
    message_type: type[Message]
    names: tuple[str, ...]
    encoders: tuple[Callable[[Any], Any], ...]
    decoders: tuple[Callable[[Any], Any], ...]


def _layout(message_type: type[Message]) -> _MessageLayout:
    names, encoders, decoders = [], [], []
    for field in dataclasses.fields(message_type):
        annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        if annotation not in _FIELD_CODECS:
            raise RuntimeError(f"{message_type.__name__}.{field.name} has no wire codec for {annotation!r}")
        encode, decode = _FIELD_CODECS[annotation]
        names.append(field.name)
        encoders.append(encode)
        decoders.append(decode)
    return _MessageLayout(message_type, tuple(names), tuple(encoders), tuple(decoders))


_LAYOUTS: dict[type[Message], _MessageLayout] = {message_type: _layout(message_type) for message_type in MESSAGE_TYPES}
_LAYOUTS_BY_TAG: dict[int, _MessageLayout] = {tag: _LAYOUTS[message_type] for tag, message_type in MESSAGE_REGISTRY.items()}

# The msgpack bounds of a frame body, from what the largest legitimate message holds. Arrays: the
# longest is an AppendEntries' entries (a body's fields and header pairs are fewer). Elements (each
# array counts itself and its members): an AppendEntries counts 6 an entry (its array, its 4 fields
# and its place in the list) and 9 for the rest, 6,153 at the bound; headers at theirs count 1,032;
# 8,192 leaves slack. Strings: a text field of MAX_TEXT_CHARS characters, 4 UTF-8 bytes each at
# most. Byte strings (an entry's payload, a snapshot chunk) are bounded by the frame alone; no
# message holds a map. So a hostile body costs at most some 8,000 completed arrays and what msgpack
# holds open, 1,023 nested arrays of up to 1,024 members: about 40 MiB, whatever the frame's size.
_MAX_BODY_ARRAY_LEN = max(MAX_ENTRIES_PER_FRAME, MAX_HEADER_PAIRS,
                          2 + max(len(layout.names) for layout in _LAYOUTS.values()))
_MAX_BODY_ELEMENTS = 8 * MAX_ENTRIES_PER_FRAME
_MAX_BODY_STR_BYTES = 4 * MAX_TEXT_CHARS


# --------------------------------------------------------------------------- frames


def encode_body(message: Message) -> bytes:
    """The msgpack body of a frame, without the length prefix."""
    layout = _LAYOUTS.get(type(message))
    if layout is None:
        raise TypeError(f"{type(message).__name__} is not a registered message type")
    body: list[Any] = [PROTOCOL_VERSION, message.TYPE_TAG]
    for name, encode in zip(layout.names, layout.encoders):
        body.append(encode(getattr(message, name)))
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def encode_frame(message: Message) -> bytes:
    """Length prefix plus body, ready to write to a stream."""
    body = encode_body(message)
    return len(body).to_bytes(LENGTH_PREFIX_BYTES, "big") + body


def decode_body(body: bytes) -> Message:
    """Decode and validate one frame body; raises ProtocolError on any defect."""
    try:
        decoded = unpack_bounded(body, max_elements=_MAX_BODY_ELEMENTS, max_array_len=_MAX_BODY_ARRAY_LEN,
                                 max_map_len=0, max_str_len=_MAX_BODY_STR_BYTES, max_bin_len=len(body))
    except Exception as error:  # msgpack raises many types; the caller must see exactly one.
        raise ProtocolError(f"undecodable frame body ({type(error).__name__})") from None
    if type(decoded) is not list or len(decoded) < 2:
        raise ProtocolError("frame body must be a list [version, type_tag, ...]")
    version, tag = decoded[0], decoded[1]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported protocol version")
    layout = _LAYOUTS_BY_TAG.get(tag) if type(tag) is int else None
    if layout is None:
        raise ProtocolError("unknown message type tag")
    values = decoded[2:]
    if len(values) != len(layout.names):
        raise ProtocolError(f"{layout.message_type.__name__} expects {len(layout.names)} fields")
    arguments = {name: decode(value) for name, decode, value in zip(layout.names, layout.decoders, values)}
    return layout.message_type(**arguments)


class FrameDecoder:
    """Streaming decoder: feed it bytes as they arrive, get back every complete message.

    The frame length is checked as soon as its 4-byte prefix is in, before
    waiting for the body, so an oversized frame is refused without buffering
    it. After the first error the decoder stays failed: the stream position is
    lost and the connection must be closed.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be positive")
        self._max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._failed = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        if self._failed:
            raise ProtocolError("decoder failed earlier; the stream cannot be resynchronised")
        self._buffer += data
        messages: list[Message] = []
        try:
            while len(self._buffer) >= LENGTH_PREFIX_BYTES:
                length = int.from_bytes(self._buffer[:LENGTH_PREFIX_BYTES], "big")
                if length == 0 or length > self._max_frame_bytes:
                    raise ProtocolError(f"frame length {length} outside 1..{self._max_frame_bytes}")
                end = LENGTH_PREFIX_BYTES + length
                if len(self._buffer) < end:
                    break
                body = bytes(self._buffer[LENGTH_PREFIX_BYTES:end])
                del self._buffer[:end]
                messages.append(decode_body(body))
        except ProtocolError:
            self._failed = True
            self._buffer.clear()
            raise
        return messages
