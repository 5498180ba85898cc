"""Hypothesis: every message type survives the codec, and no input makes the decoder raise anything but ProtocolError."""

from __future__ import annotations

import dataclasses

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (MESSAGE_TYPES, Entry, EntryKind, FrameDecoder, Message, ProtocolError, decode_body,
                      encode_frame)
from protocol.codec import unpack_bounded

MAX_FRAME_BYTES = 64 * 1024

integers = st.integers(min_value=0, max_value=2**63 - 1)
entries = st.lists(st.builds(Entry, index=integers, view=integers, kind=st.sampled_from(EntryKind),
                             payload=st.binary(max_size=64)), max_size=8).map(tuple)
headers = st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=6).map(tuple)
floors = st.lists(st.tuples(st.text(min_size=1, max_size=16), integers), max_size=9).map(tuple)
replicated_settings = st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,47}", fullmatch=True), integers,
                                      max_size=8).map(lambda settings: tuple(sorted(settings.items())))
FIELD_STRATEGIES = {
    "int": integers, "bool": st.booleans(), "str": st.text(max_size=40), "bytes": st.binary(max_size=128),
    "tuple[Entry, ...]": entries, "tuple[tuple[str, str], ...]": headers,
    "tuple[tuple[str, int], ...]": floors, "ReplicatedSettings": replicated_settings,
}


def message_strategy(message_type: type[Message]) -> st.SearchStrategy[Message]:
    fields = {field.name: FIELD_STRATEGIES[field.type] for field in dataclasses.fields(message_type)}
    return st.builds(message_type, **fields)


any_message = st.one_of([message_strategy(message_type) for message_type in MESSAGE_TYPES])


@settings(max_examples=300)
@given(message=any_message)
def test_round_trip_for_every_message_type(message: Message) -> None:
    assert FrameDecoder(MAX_FRAME_BYTES).feed(encode_frame(message)) == [message]


@given(messages=st.lists(any_message, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_a_stream_split_anywhere_decodes_to_the_same_messages(messages: list[Message], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(message) for message in messages)
    positions = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    decoder = FrameDecoder(MAX_FRAME_BYTES)
    decoded: list[Message] = []
    for start, end in zip(positions, positions[1:]):
        decoded.extend(decoder.feed(stream[start:end]))
    assert decoded == messages and decoder.buffered_bytes == 0


def decode_all(data: bytes, chunk_bytes: int) -> list[Message]:
    decoder = FrameDecoder(MAX_FRAME_BYTES)
    decoded: list[Message] = []
    for start in range(0, len(data), chunk_bytes):
        decoded.extend(decoder.feed(data[start:start + chunk_bytes]))
    return decoded


@settings(max_examples=400)
@given(data=st.binary(max_size=600), chunk_bytes=st.integers(1, 64))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes, chunk_bytes: int) -> None:
    try:
        decoded = decode_all(data, chunk_bytes)
    except ProtocolError:
        return
    assert all(isinstance(message, MESSAGE_TYPES) for message in decoded)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
)


def mutate(frame: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(frame)
    for kind, position, value in mutations:
        if not data:
            break
        position %= len(data)
        if kind == "flip":
            data[position] ^= value
        elif kind == "insert":
            data.insert(position, value)
        elif kind == "delete":
            del data[position]
        else:
            del data[position:]
    return bytes(data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(message=any_message, mutations=st.lists(mutation, min_size=1, max_size=4), chunk_bytes=st.integers(1, 512))
def test_mutated_valid_frames_raise_only_protocol_error(message: Message, mutations, chunk_bytes: int) -> None:
    try:
        decoded = decode_all(mutate(encode_frame(message), mutations), chunk_bytes)
    except ProtocolError:
        return
    # A mutation may still leave a valid frame (say, a flipped payload byte): it must decode to a real message.
    assert all(isinstance(item, MESSAGE_TYPES) for item in decoded)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20)


@settings(max_examples=400)
@given(tag=st.integers(-2, 25), version=st.integers(0, 2), fields=st.lists(msgpack_values, max_size=7))
def test_well_formed_msgpack_with_wrong_shapes_raises_only_protocol_error(tag: int, version: int, fields) -> None:
    body = msgpack.packb([version, tag, *fields], use_bin_type=True)
    try:
        message = decode_body(body)
    except ProtocolError:
        return
    assert isinstance(message, MESSAGE_TYPES)


def elements(value: object) -> int:
    """What unpack_bounded counts for ``value``: each container, itself and its members (a map's keys and values)."""
    if isinstance(value, list):
        return 1 + len(value) + sum(elements(item) for item in value)
    if isinstance(value, dict):
        return 1 + 2 * len(value) + sum(elements(key) + elements(item) for key, item in value.items())
    return 0


@settings(max_examples=300)
@given(value=msgpack_values)
def test_unpack_bounded_decodes_exactly_up_to_its_element_bound(value) -> None:
    packed = msgpack.packb(value, use_bin_type=True)
    count = elements(value)
    bounds = {"max_array_len": 6, "max_map_len": 4, "max_str_len": 40, "max_bin_len": 10}
    decoded = unpack_bounded(packed, max_elements=count, **bounds)
    assert msgpack.packb(decoded, use_bin_type=True) == packed
    if count:
        try:
            unpack_bounded(packed, max_elements=count - 1, **bounds)
        except ValueError:
            pass
        else:
            raise AssertionError("decoded past its element bound")
