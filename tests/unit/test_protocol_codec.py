"""Frame codec: round trips, length checks before the body, and strict field validation."""

from __future__ import annotations

import dataclasses
import tracemalloc

import msgpack
import pytest

from protocol import (MESSAGE_REGISTRY, PROTOCOL_VERSION, AppendEntries, AppendReply, Entry, EntryKind,
                      ForwardRequest, ForwardResponse, FrameDecoder, Heartbeat, HeartbeatReply, Hello, HelloProof,
                      HelloRefused, Ping, InstallSnapshot, PreVote, PreVoteReply, ProtocolError, ReadIndex,
                      ReadIndexReply, RequestVote, SnapshotReply, VoteReply, encode_frame)
from protocol.codec import (DEFAULT_MAX_FRAME_BYTES, MAX_ENTRIES_PER_FRAME, MAX_HEADER_PAIRS, MAX_TEXT_CHARS,
                            decode_body, unpack_bounded)

EXAMPLES = [
    RequestVote(view=3, last_index=10, last_view=2),
    VoteReply(view=3, granted=True, last_index=9),
    AppendEntries(view=4, prev_index=9, prev_view=3, commit_index=8,
                  entries=(Entry(10, 4, EntryKind.NOOP, b""), Entry(11, 4, EntryKind.COMMAND, b"\x00\xff"))),
    AppendReply(view=4, success=False, index=9, hint_index=7, hint_view=2),
    Heartbeat(view=4, commit_index=11, read_round=6, floors=(("n1", 11), ("n2", 9))),
    Heartbeat(view=4, commit_index=11, read_round=6, floors=()),
    HeartbeatReply(view=4, read_round=6, last_index=11),
    InstallSnapshot(view=5, snapshot_index=100, snapshot_view=4, offset=64, total_bytes=1000, data=b"chunk",
                    checksum=0x1234ABCD, offer=3),
    SnapshotReply(view=5, snapshot_index=100, received_bytes=69, installed=False, offer=3),
    ReadIndex(view=5, request_id=12),
    ReadIndexReply(view=5, request_id=12, read_index=40, ok=True),
    PreVote(view=6, last_index=12, last_view=5, poll=4),
    PreVoteReply(view=6, granted=False, last_index=12, poll=4),
    Hello(node_id="n1", nonce=b"\x01" * 16, incarnation=b"\x02" * 16),
    Hello(node_id="n1", nonce=b"\x01" * 16, incarnation=b"\x02" * 16,
          settings=(("a.b", 0), ("idempotency.retention_ms", 172_800_000))),
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
        decoder.feed(encode_frame(VoteReply(1, True, 0)))  # stays failed


def test_zero_length_frame_is_refused() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


@pytest.mark.parametrize("body", [
    [PROTOCOL_VERSION + 1, 2, 3, True, 4],       # unknown version
    [PROTOCOL_VERSION, 99, 3, True, 4],           # unknown tag
    [PROTOCOL_VERSION, 2, 3, True],               # missing field
    [PROTOCOL_VERSION, 2, 3, True, 4, 5],         # extra field
    [PROTOCOL_VERSION, 2, True, True, 4],         # bool where an int belongs
    [PROTOCOL_VERSION, 2, -1, True, 4],           # negative int
    [PROTOCOL_VERSION, 2, 3, 1, 4],               # int where a bool belongs
    [PROTOCOL_VERSION, 5, 1, 1, 1, [["n1"]]],                            # short floor pair
    [PROTOCOL_VERSION, 5, 1, 1, 1, [["n1", -1]]],                        # negative floor
    [PROTOCOL_VERSION, 5, 1, 1, 1, [["", 1]]],                           # empty member id
    [PROTOCOL_VERSION, 5, 1, 1, 1, [["x" * 65, 1]]],                     # member id too long
    [PROTOCOL_VERSION, 5, 1, 1, 1, [[f"n{i}", 1] for i in range(10)]],   # more floors than members
    [PROTOCOL_VERSION, 5, 1, 1, 1, {"n1": 1}],                           # floors as a map
    [PROTOCOL_VERSION, 16, b"n1", b"x"],          # bytes where text belongs
    [PROTOCOL_VERSION, 16, "n1", "x"],            # text where bytes belong
    [PROTOCOL_VERSION, 16, "n1", b"x", b"y", [["b", 1], ["a", 1]]],      # settings out of order
    [PROTOCOL_VERSION, 16, "n1", b"x", b"y", [["a", 1], ["a", 2]]],      # a setting twice
    [PROTOCOL_VERSION, 16, "n1", b"x", b"y", [["a=1", 1]]],              # a name that could forge the proof
    [PROTOCOL_VERSION, 16, "n1", b"x", b"y", [["a" * 49, 1]]],           # a name too long
    [PROTOCOL_VERSION, 16, "n1", b"x", b"y", [["a", -1]]],               # a negative value
    [PROTOCOL_VERSION, 16, "n1", b"x", b"y", [["a", True]]],             # a boolean value
    [PROTOCOL_VERSION, 16, "n1", b"x", b"y", [[f"s{i}", 1] for i in range(9)]],  # more than 8 settings
    [PROTOCOL_VERSION, 16, "n1", b"x", b"y", {"a": 1}],                  # settings as a map
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


# --------------------------------------------------------------------------- msgpack bounds


def peak_bytes_of(function, *arguments) -> tuple[BaseException | None, int]:
    """What ``function(*arguments)`` raised (None if nothing), and the peak of what it allocated meanwhile."""
    tracemalloc.start()
    try:
        function(*arguments)
        raised = None
    except Exception as error:
        raised = error
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak


def array_header(length: int) -> bytes:
    return b"\xdd" + length.to_bytes(4, "big")


def flat_empty_arrays(size: int) -> bytes:
    """One array holding as many empty arrays as ``size`` bytes allow."""
    return array_header(size - 5) + b"\x90" * (size - 5)


def nested_empty_containers(size: int, empty: bytes = b"\x90") -> bytes:
    """Arrays of 1,024 arrays of 1,024 empty containers (each under every per-container bound), ``size`` bytes."""
    inner = array_header(1024) + empty * 1024
    middle = array_header(1024) + inner * 1024
    count = (size - 5) // len(middle)
    rest = size - 5 - count * len(middle) - 5
    return array_header(count + 1) + middle * count + array_header(rest) + empty * rest


def deep_open_arrays(size: int) -> bytes:
    """Chains of 1,020 nested arrays, each holding 1,023 fresh integers before its child: what msgpack builds
    before any of those arrays is complete. ``size`` bytes."""
    level = array_header(1024) + b"\xf0" * 1023  # -16: an int object of its own for each byte
    chain = level * 1020 + b"\x90"
    count = (size - 5) // len(chain)
    rest = size - 5 - count * len(chain) - 5
    return array_header(count + 1) + chain * count + array_header(rest) + b"\xf0" * rest


@pytest.mark.parametrize("shape", [flat_empty_arrays, nested_empty_containers,
                                   lambda size: nested_empty_containers(size, b"\x80"), deep_open_arrays],
                         ids=["flat-arrays", "nested-arrays", "nested-maps", "deep-open-arrays"])
def test_a_frame_of_the_largest_size_made_of_containers_is_refused_with_bounded_memory(shape) -> None:
    """msgpack's own bounds are per container: without a bound on the whole, 16 MiB of nested empty
    arrays took about 1 GiB before any field was checked. What is left is what msgpack holds in arrays
    not yet complete (about 40 MiB at most, deep-open-arrays)."""
    body = shape(DEFAULT_MAX_FRAME_BYTES)
    assert len(body) == DEFAULT_MAX_FRAME_BYTES
    raised, peak = peak_bytes_of(decode_body, body)
    assert isinstance(raised, ProtocolError)
    assert peak < 3 * DEFAULT_MAX_FRAME_BYTES, f"{peak / 2**20:.1f} MiB allocated"
    with pytest.raises(ProtocolError):  # through the stream decoder too
        FrameDecoder().feed(len(body).to_bytes(4, "big") + body)


def test_nested_containers_that_claim_the_most_members_cost_a_bounded_memory() -> None:
    """What unpack_bounded leaves to msgpack: the containers it has not completed, at most 1,023 nested.
    msgpack 1.2 preallocates at most 10,000 members for an array, whatever its header claims; 1.1
    allocated them all, so 1,023 headers claiming 100,000 members (a 5 KiB frame, within the bounds of a
    channel frame or a forwarded body) took 780 MiB where they now take 78 MiB. pyproject.toml requires
    msgpack 1.2. (Maps are built as dicts, not preallocated.)"""
    claims = 100_000
    frame = (b"\xdd" + claims.to_bytes(4, "big")) * 1023  # array32 headers
    raised, peak = peak_bytes_of(lambda: unpack_bounded(frame, max_elements=1_000_000, max_array_len=claims,
                                                        max_map_len=claims, max_str_len=len(frame),
                                                        max_bin_len=len(frame)))
    assert isinstance(raised, ValueError)  # incomplete: no container ever completes
    assert peak < 100 * 2**20, f"{peak / 2**20:.1f} MiB allocated"


def test_the_largest_legitimate_frames_decode_and_one_past_a_bound_is_refused() -> None:
    most = 2**63 - 1
    entries = tuple(Entry(most - number, most, EntryKind.COMMAND, b"p") for number in range(MAX_ENTRIES_PER_FRAME))
    largest_batch = AppendEntries(view=most, prev_index=most, prev_view=most, commit_index=most, entries=entries)
    # One entry whose payload fills the largest frame.
    header = len(encode_frame(AppendEntries(1, 0, 0, 0, (Entry(1, 1, EntryKind.COMMAND, b"x" * 70_000),))))
    full_frame = AppendEntries(1, 0, 0, 0, (Entry(1, 1, EntryKind.COMMAND,
                                                  b"x" * (DEFAULT_MAX_FRAME_BYTES + 70_000 + 4 - header)),))
    widest_text = "\U0001F600" * MAX_TEXT_CHARS  # 4 bytes of UTF-8 a character
    headers = ForwardResponse(request_id=most, status=599, body=b"b" * 1024,
                              headers=tuple((widest_text[:100], widest_text[:1000]) for _ in range(MAX_HEADER_PAIRS)))
    for message in (largest_batch, full_frame, headers, HelloRefused(node_id="n1", reason=widest_text)):
        frame = encode_frame(message)
        assert len(frame) <= DEFAULT_MAX_FRAME_BYTES + 4
        assert FrameDecoder().feed(frame) == [message]
    assert len(encode_frame(full_frame)) == DEFAULT_MAX_FRAME_BYTES + 4
    too_many = dataclasses.replace(largest_batch, entries=entries + (Entry(1, 1, EntryKind.NOOP, b""),))
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(encode_frame(too_many))
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(encode_frame(HelloRefused(node_id="n1", reason=widest_text + "x")))
