"""Frame codec: round trips, length checks before the body, and strict field validation."""

from __future__ import annotations

import msgpack
import pytest

from protocol import (MESSAGE_REGISTRY, PROTOCOL_VERSION, AppendEntries, AppendReply, Entry, EntryKind,
                      ForwardRequest, ForwardResponse, FrameDecoder, Heartbeat, HeartbeatReply, Hello, HelloProof,
                      HelloRefused, Ping, InstallSnapshot, PreVote, PreVoteReply, ProtocolError, ReadIndex,
                      ReadIndexReply, RequestVote, SnapshotReply, VoteReply, encode_frame)

EXAMPLES = [
    RequestVote(view=3, last_index=10, last_view=2),
    VoteReply(view=3, granted=True),
    AppendEntries(view=4, prev_index=9, prev_view=3, commit_index=8,
                  entries=(Entry(10, 4, EntryKind.NOOP, b""), Entry(11, 4, EntryKind.COMMAND, b"\x00\xff"))),
    AppendReply(view=4, success=False, index=9, hint_index=7, hint_view=2),
    Heartbeat(view=4, commit_index=11, read_round=6),
    HeartbeatReply(view=4, read_round=6),
    InstallSnapshot(view=5, snapshot_index=100, snapshot_view=4, offset=64, total_bytes=1000, data=b"chunk",
                    checksum=0x1234ABCD, offer=3),
    SnapshotReply(view=5, snapshot_index=100, received_bytes=69, installed=False, offer=3),
    ReadIndex(view=5, request_id=12),
    ReadIndexReply(view=5, request_id=12, read_index=40, ok=True),
    PreVote(view=6, last_index=12, last_view=5),
    PreVoteReply(view=6, granted=False),
    Hello(node_id="n1", nonce=b"\x01" * 16, incarnation=b"\x02" * 16),
    HelloProof(node_id="n2", mac=b"\x02" * 32),
    HelloRefused(node_id="n2", reason="this node's data directory is not the one it had"),
    ForwardRequest(request_id=17, kind="tokenize", body=b'{"values":[]}'),
    ForwardResponse(request_id=17, status=201, body=b"{}", headers=(("Retry-After", "1"),)),
    Ping(sequence=3),
]


def body_frame(body: list) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return len(packed).to_bytes(4, "big") + packed


def test_every_registered_type_has_an_example() -> None:
    assert {type(message) for message in EXAMPLES} == set(MESSAGE_REGISTRY.values())


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda message: type(message).__name__)
def test_round_trip(message) -> None:
    assert FrameDecoder().feed(encode_frame(message)) == [message]


def test_byte_by_byte_feeding_and_several_frames_per_chunk() -> None:
    stream = b"".join(encode_frame(message) for message in EXAMPLES)
    decoder = FrameDecoder()
    decoded = []
    for position in range(len(stream)):
        decoded.extend(decoder.feed(stream[position:position + 1]))
    assert decoded == EXAMPLES and decoder.buffered_bytes == 0
    assert FrameDecoder().feed(stream) == EXAMPLES


def test_oversize_is_refused_from_the_prefix_alone() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    with pytest.raises(ProtocolError):
        decoder.feed((101).to_bytes(4, "big"))
    with pytest.raises(ProtocolError):
        decoder.feed(encode_frame(VoteReply(1, True)))  # stays failed


def test_zero_length_frame_is_refused() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


@pytest.mark.parametrize("body", [
    [PROTOCOL_VERSION + 1, 2, 3, True],          # unknown version
    [PROTOCOL_VERSION, 99, 3, True],              # unknown tag
    [PROTOCOL_VERSION, 2, 3],                     # missing field
    [PROTOCOL_VERSION, 2, 3, True, 4],            # extra field
    [PROTOCOL_VERSION, 2, True, True],            # bool where an int belongs
    [PROTOCOL_VERSION, 2, -1, True],              # negative int
    [PROTOCOL_VERSION, 2, 3, 1],                  # int where a bool belongs
    [PROTOCOL_VERSION, 16, b"n1", b"x"],          # bytes where text belongs
    [PROTOCOL_VERSION, 16, "n1", "x"],            # text where bytes belong
    [PROTOCOL_VERSION, 3, 1, 0, 0, 0, [[1, 1, 7, b""]]],   # unknown entry kind
    [PROTOCOL_VERSION, 3, 1, 0, 0, 0, [[1, 1, 0]]],        # short entry
    [PROTOCOL_VERSION, 19, 1, 200, b"", [["a"]]],          # short header pair
    {"version": 1},                                        # not a list
    [PROTOCOL_VERSION],                                    # too short
], ids=str)
def test_invalid_bodies_raise_protocol_error(body) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(body_frame(body))


def test_undecodable_msgpack_raises_protocol_error() -> None:
    for garbage in (b"\xc1", b"\x92\x01", b"\xd9\x02\xff\xfe", b"\x91\xc7\x01\x05x"):
        with pytest.raises(ProtocolError):
            FrameDecoder().feed(len(garbage).to_bytes(4, "big") + garbage)


def test_encoding_an_unregistered_object_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        encode_frame(object())  # type: ignore[arg-type]
