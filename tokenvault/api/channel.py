"""The local channel between a node's core process and its HTTP worker processes.

The core creates one Unix socket pair per worker and hands one end to the
worker at spawn (tokenvault.api.workers); nothing else can reach it, so the
channel needs no authentication, but the core still treats every frame as
hostile: each frame is bounded before it is buffered and every call's
arguments are checked before the service sees them (tokenvault.api.core_calls).

Frames: a 4-byte big-endian length, then one msgpack array, at most
``max_frame_bytes``: the largest legitimate message of the node's limits (a
request of ``max_body_bytes`` sealed, with a token and a metadata ciphertext an
item; an answer of ``max_items`` values with their metadata; never less than
the default limits give, which covers the pages and tables that do not grow
with them), decoded with bounds on every container and on the whole (``decode_message``).
Four kinds of message:

- ``[CALL, id, method, arguments]``: either side asks (a worker calls the
  core's service; the core asks a worker for its metrics); ``arguments`` is a map. ``id`` is
  the caller's (an integer, never reused): a call whose id is still in use on the receiving side
  closes the channel, as any frame out of shape does.
- ``[REPLY, id, is_outcome, result]``: the answer; an ``Outcome`` travels as
  ``[status, body, replayed]`` with ``is_outcome`` true (a status that cannot carry a body, 1xx, 204,
  205, 304 or past 599, is out of shape and closes the channel: the worker writes it to its client).
- ``[FAIL, id, status, problem, detail, headers, no_effect]``: a ServiceError,
  rebuilt on the caller's side as the same class (tokenvault.errors.error_from_problem),
  so a worker answers exactly what the single process would have answered. A header that frames the
  HTTP answer (Content-Length, Transfer-Encoding, Connection, ...) or is no header name or value makes
  the failure out of shape: the worker answers 503.
- ``[PUSH, topic, payload]``: one-way news, core to worker (the runtime key
  table after every change, so a revoked key is refused by every worker).
- ``[CANCEL, id]``: the caller gave up on call ``id`` (its request was
  cancelled: the client hung up, a timeout). The handler is not interrupted
  (the core finishes or drops the operation as for a client that hung up);
  it can see that its caller is gone (``current_call().abandoned``) and undo
  what nobody will use, as a backup stream opened for a gone request.

A handler runs knowing which channel and call it serves (``current_call``),
and a side can ask to be told when a channel closes (``on_close``): the core
ties what a worker holds open (its backup streams) to the worker's channel.

A channel that closes fails every call waiting on it with ``ChannelClosed``. Calls
wait for the socket to drain before they finish, and at most MAX_CONCURRENT_CALLS
are served at once, so a side that stops reading makes the other one wait, never
buffer without bound. What the calls a side serves hold is bounded in bytes too: the frames of the
calls it accepted and has not answered take at most ``max_call_bytes_in_flight`` (by default a frame
for each request a worker may work on at once, and one more: see ``max_call_bytes_in_flight``), and a
call that would pass it is answered 503 ``overloaded`` at once, its arguments dropped, the channel up.
Pushes do not wait: once more than HOLD_BACK_BYTES wait in
the socket's buffer, every frame is held back, in order, until it drains, and a
push of a topic whose previous push is still held takes that push's place. Each
push carries the whole state of its topic (the key table, the active epoch's
keys) or a signal that is the same twice (catch up, reload TLS), so a worker
that stopped reading gets at most one push a topic, newest, and still never
reads an answer before a push that preceded it (a worker decrypts with the keys
of the last push before an answer: tokenvault.api.remote).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import re
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgpack

from protocol.codec import unpack_bounded
from tokenvault.api.httpserver import FRAMING_HEADERS
from tokenvault.core.commands import MAX_ITEMS, MAX_METADATA_CIPHERTEXT_BYTES, MAX_TOKEN_CHARS
from tokenvault.errors import (InvalidRequest, Outcome, Overloaded, PayloadTooLarge, ServiceError, Unavailable,
                               error_from_problem, is_body_status)
from tokenvault.logs import get_logger

log = get_logger("channel")

CALL = 0
REPLY = 1
FAIL = 2
PUSH = 3
CANCEL = 4

_LENGTH = struct.Struct(">I")
# What a frame may hold beyond a request body: headers of the call and the answer's JSON framing.
FRAME_OVERHEAD_BYTES = 64 * 1024
# What one item adds to a message beyond its value: its token (twice in a retokenize's answer), a metadata
# ciphertext or document, and msgpack's headers.
ITEM_OVERHEAD_BYTES = 2 * MAX_TOKEN_CHARS + MAX_METADATA_CIPHERTEXT_BYTES + 32
# The bound is never below what the default limits (8 MiB bodies) give: the messages that do not grow with
# the limits fit in it (a read_points call of MAX_CONCURRENT_CALLS points of at most about 1 KiB, an audit
# page, the key table of at most 1,000 keys, the epoch list, the metrics exposition).
MIN_FRAME_BYTES = 2 * 8 * 1024 * 1024
# The limits' defaults (tokenvault.config.LimitsConfig), for a caller that gives only the body bound.
DEFAULT_MAX_ITEMS = 1000
DEFAULT_MAX_VALUE_BYTES = 4096
# Past this many bytes in the socket's write buffer, frames are held back (and pushes coalesced) until it drains.
HOLD_BACK_BYTES = 1024 * 1024
# Calls one side runs at once for the other; beyond it a call is refused with 503 at once.
MAX_CONCURRENT_CALLS = 4096
# Frames held unwritten (the other side is not reading) past which a call this side must refuse closes the
# channel instead: a refusal does not wait for the socket as an answer does, so a side that sends calls
# and never reads its answers would otherwise grow them without bound. A working side has no more calls
# waiting than the requests it works on, whose answers (MAX_CONCURRENT_CALLS at most, each waiting for
# the socket) and refusals stay far below this.
MAX_HELD_FRAMES_WHEN_REFUSING = 2 * MAX_CONCURRENT_CALLS
# [http] max_inflight_requests' default (tokenvault.config.HttpConfig): the requests a worker of a
# one-worker node works on at once, for a channel not given its own byte budget (max_call_bytes_in_flight).
DEFAULT_REQUESTS_IN_FLIGHT = 256
# The problem type of a failure that is no ServiceError of this project (a bug): answered as 503.
_INTERNAL_TITLE = "Service unavailable"
# The msgpack bounds of a frame (decode_message), from the largest legitimate ones. An array or map
# holds at most MAX_ITEMS members: the ceiling of limits.max_items (a call's values or tokens, a
# reveal's answer) and of the epochs a node keeps keys for (tokenvault.core.sealer.MAX_EPOCHS); an audit
# page, read points, a token page and the key table are shorter. In elements (each container counts
# itself and its members, a map's keys and values), the largest are the epoch list at that ceiling
# (8 an epoch: its map of 3 and its place in the list) and a sealed tokenize with metadata (6 an item:
# the value, the [token, ciphertext] pair, the metadata ciphertext): 800,000 at most; 10x MAX_ITEMS
# leaves slack, and a frame of nested empty containers is refused past about 35 MiB of them. Strings
# and byte strings (a value, a body, a backup chunk, the metrics page) are bounded by the frame alone.
MAX_CONTAINER_ITEMS = MAX_ITEMS
MAX_FRAME_ELEMENTS = 10 * MAX_ITEMS

# What a worker takes from its core's answers to write into an HTTP answer (_decode_result,
# decode_failure): a status that carries a body, and headers that do not frame the answer.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]{0,1024}")
# The headers the HTTP server writes itself, and those of the problem body the worker writes.
_SERVER_HEADERS = FRAMING_HEADERS | {"content-type", "content-encoding"}

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
PushHandler = Callable[[str, Any], None]


class ChannelClosed(Unavailable):
    """The other process went away with this call unanswered."""


class UnencodableMessage(InvalidRequest):
    """A message msgpack cannot encode: 400 for a call's arguments; for an answer, the caller gets 503."""


class MessageTooLarge(PayloadTooLarge):
    """A message over the channel's frame bound: 413 for a call's arguments (the request is too large for
    the node to carry to its core); an answer over it is answered 503 instead."""


class ChannelProtocolError(Exception):
    """The other side sent a frame out of shape or over the bound; the channel is closed."""


def max_frame_bytes(max_body_bytes: int, max_items: int = DEFAULT_MAX_ITEMS,
                    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> int:
    """The frame bound of a node with these limits (``[limits]``): its largest request, a body of
    ``max_body_bytes`` with its values sealed (twice the body) and a token and metadata ciphertext an item;
    its largest answer, ``max_items`` values of ``max_value_bytes`` with their tokens and metadata; and at
    least MIN_FRAME_BYTES. Both ends of a channel must use the same limits. A worker's merged calls keep
    within it (tokenvault.api.merge); a message still over it is refused with 413 (a call) or 503 (an
    answer), never sent."""
    request = 2 * max_body_bytes + max_items * ITEM_OVERHEAD_BYTES
    answer = max_items * (max_value_bytes + ITEM_OVERHEAD_BYTES)
    return max(request, answer, MIN_FRAME_BYTES) + FRAME_OVERHEAD_BYTES


def max_call_bytes_in_flight(max_frame_bytes: int, requests_in_flight: int = DEFAULT_REQUESTS_IN_FLIGHT) -> int:
    """The bytes of calls a core holds for one worker at most (the frames of the calls it accepted and has
    not answered yet): a frame bound for each request the worker may work on at once (``requests_in_flight``,
    its share of ``[http] max_inflight_requests``: a request waits on one call at a time, and a merged call
    is smaller than the requests it merges), and one more for the calls no request bound counts (health,
    metrics, backup reads, flush_store: small ones). A working worker stays within it; a broken one is
    answered 503 overloaded past it, instead of the core holding MAX_CONCURRENT_CALLS frames (about 69 GiB
    at the default limits). Calls whose requests the worker gave up on (a timeout) count until the core ends them,
    so a core that far behind refuses new ones as an overload too."""
    return (requests_in_flight + 1) * max_frame_bytes


class ServedCall:
    """A call this side is answering: the channel it came on, and whether its caller gave up on it."""

    __slots__ = ("channel", "call_id", "abandoned")

    def __init__(self, channel: Channel, call_id: int) -> None:
        self.channel = channel
        self.call_id = call_id
        self.abandoned = False

    @property
    def caller_gone(self) -> bool:
        """The caller will never use the answer: it cancelled the call, or its channel closed."""
        return self.abandoned or self.channel.closed.is_set()

    def on_abandon(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` if the caller gives this call up, even after it was answered (its CANCEL may
        cross the answer); kept until ``forget_abandon`` or the channel closes."""
        self.channel._abandon_callbacks[self.call_id] = callback

    def forget_abandon(self) -> None:
        self.channel._abandon_callbacks.pop(self.call_id, None)


_CURRENT_CALL: contextvars.ContextVar[ServedCall | None] = contextvars.ContextVar("channel_call", default=None)


def current_call() -> ServedCall | None:
    """The channel call the running handler serves (None outside a channel's handler)."""
    return _CURRENT_CALL.get()


class Channel:
    """One end of a channel: ``call`` the other side, ``push`` to it, serve its calls with ``handlers``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 handlers: Mapping[str, Handler], on_push: PushHandler | None = None,
                 max_frame_bytes: int, max_call_bytes: int | None = None, name: str) -> None:
        self._reader = reader
        self._writer = writer
        self._handlers = dict(handlers)
        self._on_push = on_push
        self._max_frame_bytes = max_frame_bytes
        # The bytes of the other side's calls this side may hold unanswered (by default
        # max_call_bytes_in_flight of the frame bound), and those it holds (_serve).
        self._max_call_bytes = max_call_bytes_in_flight(max_frame_bytes) if max_call_bytes is None else max_call_bytes
        self._call_bytes = 0
        self.name = name
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._serving: set[asyncio.Task[None]] = set()
        self._served: dict[int, ServedCall] = {}
        self._abandon_callbacks: dict[int, Callable[[], None]] = {}  # ServedCall.on_abandon
        self._close_callbacks: list[Callable[[], None]] = []
        self.closed = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        # Frames sent in one turn of the event loop go out in one write at its end (_flush): under load
        # the core answers many calls a turn, and a write is a system call.
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        # Where in _outgoing the unwritten push of each topic is: a newer push of the topic replaces it.
        self._held_pushes: dict[str, int] = {}
        self._drainer: asyncio.Task[None] | None = None

    @property
    def max_frame_bytes(self) -> int:
        return self._max_frame_bytes

    @property
    def max_call_bytes(self) -> int:
        """The bytes of the other side's calls this side holds unanswered at most (max_call_bytes_in_flight)."""
        return self._max_call_bytes

    def start(self) -> Channel:
        self._run_task = asyncio.get_running_loop().create_task(self._run(), name=f"channel-{self.name}")
        return self

    # ------------------------------------------------------------------ sending
    def _send(self, message: list[Any], push_topic: str | None = None) -> None:
        try:
            frame = msgpack.packb(message, use_bin_type=True)
        except (OverflowError, TypeError, ValueError):
            # A client's request holding what msgpack cannot carry (an integer past 64 bits, say) is
            # the client's error; everything from the core itself packs.
            raise UnencodableMessage("the request holds a value the node cannot carry (an integer out of "
                                     "range?)") from None
        if len(frame) > self._max_frame_bytes:
            raise MessageTooLarge(f"the request needs a message of {len(frame)} bytes between the node's "
                                  f"processes, over their {self._max_frame_bytes}-byte bound; send fewer or "
                                  "smaller items")
        if self.closed.is_set() or self._writer.is_closing():
            raise ChannelClosed("the node's core process is not reachable; the request had no effect here, retry",
                                no_effect=True)
        framed = _LENGTH.pack(len(frame)) + frame
        if push_topic is not None:
            held = self._held_pushes.get(push_topic)
            if held is not None:
                # The newest state takes the older push's place: every frame after that place still reads
                # at least the state that preceded it.
                self._outgoing[held] = framed
                return
            self._held_pushes[push_topic] = len(self._outgoing)
        self._outgoing.append(framed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self, force: bool = False) -> None:
        """Write every frame sent since the last flush, in order, at once; hold them all while more than
        HOLD_BACK_BYTES wait in the socket's buffer (the other side is not reading), until it drains."""
        self._flush_scheduled = False
        if not self._outgoing or self._writer.is_closing():
            return
        if not force and self._writer.transport.get_write_buffer_size() > HOLD_BACK_BYTES:
            if self._drainer is None and not self.closed.is_set():
                self._drainer = asyncio.get_running_loop().create_task(self._flush_when_drained())
            return
        frames, self._outgoing = self._outgoing, []
        self._held_pushes.clear()
        self._writer.write(b"".join(frames))

    async def _flush_when_drained(self) -> None:
        try:
            await self._writer.drain()
            if self._writer.transport.get_write_buffer_size() > HOLD_BACK_BYTES:
                await asyncio.sleep(0.01)  # a transport that does not pause: look again shortly
        except (OSError, RuntimeError):  # ConnectionError and the rest the socket may raise (ETIMEDOUT)
            self._close_now()
            return
        finally:
            self._drainer = None
        self._flush()

    async def call(self, method: str, arguments: dict[str, Any]) -> Any:
        """Ask the other side to run ``method``; its result, or the ServiceError it raised."""
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        sent = False
        try:
            self._send([CALL, call_id, method, arguments])
            sent = True
            await self._writer.drain()
            return await future
        except (ConnectionError, RuntimeError):
            raise ChannelClosed("the node's core process is not reachable; retry") from None
        except asyncio.CancelledError:
            if sent:  # its answer, come or to come, is lost: the other side may undo what it did for it
                self._tell_cancelled(call_id)
            raise
        finally:
            self._waiting.pop(call_id, None)

    def _tell_cancelled(self, call_id: int) -> None:
        """Tell the other side this side no longer waits for call ``call_id``'s answer."""
        try:
            self._send([CANCEL, call_id])
        except ServiceError:
            pass  # closed: the other side sees the channel close instead

    def push(self, topic: str, payload: Any) -> None:
        """Send the whole state of ``topic`` (or a signal); never waits: see the module's docstring."""
        self._send([PUSH, topic, payload], push_topic=topic)

    # ------------------------------------------------------------------ receiving
    async def _run(self) -> None:
        try:
            while True:
                header = await self._reader.readexactly(_LENGTH.size)
                (length,) = _LENGTH.unpack(header)
                if length > self._max_frame_bytes:
                    raise ChannelProtocolError(f"a frame of {length} bytes is over the bound")
                message = decode_message(await self._reader.readexactly(length))
                self._dispatch(message, length)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the other process is gone
        except (ChannelProtocolError, ValueError, TypeError, msgpack.UnpackException) as error:
            log.error("channel.refused", channel=self.name, error_type=type(error).__name__)
        finally:
            self._close_now()

    def _dispatch(self, message: object, frame_bytes: int) -> None:
        if not isinstance(message, list) or not message:
            raise ChannelProtocolError("a message is not a non-empty array")
        # The kind and a call's id are plain integers: msgpack's true is no REPLY, nor call 1's id.
        kind = message[0] if type(message[0]) is int else None
        call_id = message[1] if len(message) > 1 and type(message[1]) is int else None
        if kind == CALL and len(message) == 4 and call_id is not None and isinstance(message[2], str) \
                and isinstance(message[3], dict):
            if call_id in self._served or call_id in self._abandon_callbacks:
                # An id still in use here (served, or its abandon still awaited): its CANCEL, its
                # answer and its served call could no longer be told from the other's.
                raise ChannelProtocolError("a call whose id is in use")
            self._serve(call_id, message[2], message[3], frame_bytes)
        elif kind == REPLY and len(message) == 4 and call_id is not None:
            future = self._waiting.get(call_id)
            if future is not None and not future.done():
                future.set_result(_decode_result(message[2], message[3]))
        elif kind == FAIL and len(message) == 7 and call_id is not None:
            future = self._waiting.get(call_id)
            if future is not None and not future.done():
                future.set_exception(decode_failure(message[2:]))
        elif kind == PUSH and len(message) == 3 and isinstance(message[1], str):
            if self._on_push is not None:
                self._on_push(message[1], message[2])
        elif kind == CANCEL and len(message) == 2 and call_id is not None:
            served = self._served.get(call_id)
            if served is not None:
                served.abandoned = True
            abandon = self._abandon_callbacks.pop(call_id, None)
            if abandon is not None:
                abandon()
        else:
            raise ChannelProtocolError("a message of unknown kind or shape")

    def _serve(self, call_id: int, method: str, arguments: dict[str, Any], frame_bytes: int) -> None:
        """Run call ``call_id``, whose frame took ``frame_bytes``: held, with its arguments, until answered."""
        handler = self._handlers.get(method)
        if handler is None:
            self._refuse(call_id, Unavailable("the core refused a channel call (unknown call)"))
            return
        if len(self._serving) >= MAX_CONCURRENT_CALLS:
            # An overload like the byte budget's below (503 overloaded, no effect), not a failure of the node.
            self._refuse(call_id, Overloaded("the node's core holds as many calls from this process at "
                                             "once as it takes; the request had no effect: retry later"))
            return
        if self._call_bytes + frame_bytes > self._max_call_bytes:
            # Refused before it is held: its arguments go with this frame, the channel stays up.
            self._refuse(call_id, Overloaded("the node's core holds as many calls from this process as "
                                             "it takes; the request had no effect: retry later"))
            return
        self._call_bytes += frame_bytes
        served = ServedCall(self, call_id)
        self._served[call_id] = served
        context = contextvars.copy_context()
        context.run(_CURRENT_CALL.set, served)
        task = asyncio.get_running_loop().create_task(self._answer(call_id, handler, arguments), context=context)
        self._serving.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._serving.discard(finished)
            self._served.pop(call_id, None)
            self._call_bytes -= frame_bytes

        task.add_done_callback(done)

    async def _answer(self, call_id: int, handler: Handler, arguments: dict[str, Any]) -> None:
        try:
            result = await handler(arguments)
        except ServiceError as error:
            self._reply_failure(call_id, error)
            return
        except Exception as error:  # a bug on this side: answer 503, never leave the caller waiting
            log.error("channel.call_failed", channel=self.name, error_type=type(error).__name__)
            self._reply_failure(call_id, Unavailable("the request failed inside the node; retry"))
            return
        try:
            if isinstance(result, Outcome):
                self._send([REPLY, call_id, True, [result.status, result.body, result.replayed]])
            else:
                self._send([REPLY, call_id, False, result])
        except UnencodableMessage:
            log.error("channel.answer_unencodable", channel=self.name)
            self._reply_failure(call_id, Unavailable("the node could not encode its answer; retry"))
        except MessageTooLarge:
            log.error("channel.answer_too_large", channel=self.name)
            self._reply_failure(call_id, Unavailable("the answer is larger than the node's processes carry "
                                                     "between them; ask for fewer items at a time"))
        except ServiceError as error:
            self._reply_failure(call_id, error)
        try:
            # Back-pressure: a peer that stops reading holds this task, not an ever-growing write buffer.
            await self._writer.drain()
        except (ConnectionError, RuntimeError):
            self._close_now()

    def _refuse(self, call_id: int, error: ServiceError) -> None:
        """Refuse call ``call_id`` at once (an overload, an unknown call); ChannelProtocolError, which closes
        the channel, when the other side does not read what it was answered (MAX_HELD_FRAMES_WHEN_REFUSING)."""
        if len(self._outgoing) >= MAX_HELD_FRAMES_WHEN_REFUSING:
            raise ChannelProtocolError("the other side sends calls past the bounds and does not read the answers")
        self._reply_failure(call_id, error)

    def _reply_failure(self, call_id: int, error: ServiceError) -> None:
        try:
            self._send([FAIL, call_id, *encode_failure(error)])
        except ServiceError:
            pass  # the channel is closed: the caller's side fails the call itself

    # ------------------------------------------------------------------ closing
    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when this channel closes (at once if it is closed already)."""
        if self.closed.is_set():
            callback()
        else:
            self._close_callbacks.append(callback)

    def _close_now(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelClosed("the node's core process went away before answering; "
                                                   "the request may or may not have taken effect: retry, ideally "
                                                   "with an Idempotency-Key"))
        for task in self._serving:
            task.cancel()
        if self._drainer is not None:
            self._drainer.cancel()
        self._flush(force=True)  # what was answered before the close still goes out
        self._writer.close()
        self._abandon_callbacks.clear()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception as error:  # a bug in a callback must not stop the others
                log.error("channel.close_callback_failed", channel=self.name, error_type=type(error).__name__)

    async def close(self) -> None:
        self._close_now()
        if self._run_task is not None:
            self._run_task.cancel()
            await asyncio.gather(self._run_task, return_exceptions=True)


def decode_message(frame: bytes) -> Any:
    """The msgpack document of one frame's body, bounded (MAX_CONTAINER_ITEMS, MAX_FRAME_ELEMENTS); raises
    ValueError or msgpack.UnpackException, on which the channel is closed."""
    return unpack_bounded(frame, max_elements=MAX_FRAME_ELEMENTS, max_array_len=MAX_CONTAINER_ITEMS,
                          max_map_len=MAX_CONTAINER_ITEMS, max_str_len=len(frame), max_bin_len=len(frame))


def _decode_result(is_outcome: object, result: Any) -> Any:
    if is_outcome is True:
        if (not isinstance(result, list) or len(result) != 3 or not is_body_status(result[0])
                or not isinstance(result[1], bytes) or not isinstance(result[2], bool)):
            raise ChannelProtocolError("an outcome out of shape")
        return Outcome(result[0], result[1], result[2])
    return result


def _is_failure_header(name: object, value: object) -> bool:
    """Whether a failure may carry the header ``name: value`` to the client: a header name (an RFC 9110
    token) that is not one the HTTP server writes itself or that frames the answer, and a value of
    visible ASCII, spaces and tabs. Every header an error of this project carries passes (Retry-After,
    WWW-Authenticate, Allow)."""
    return (isinstance(name, str) and isinstance(value, str) and _HEADER_NAME.fullmatch(name) is not None
            and name.lower() not in _SERVER_HEADERS and _HEADER_VALUE.fullmatch(value) is not None)


def encode_failure(error: ServiceError) -> list[Any]:
    """``[status, problem, detail, headers, no_effect]``: ``error`` as the channel carries it (decode_failure)."""
    return [error.status, error.problem, error.detail, dict(error.headers), error.no_effect]


def decode_failure(fields: list[Any]) -> ServiceError:
    """The ServiceError of ``[status, problem, detail, headers, no_effect]`` (a FAIL frame's fields, a read
    point's error), headers and effect included; Unavailable for anything out of shape, a header the
    worker may not pass on to its client included (_is_failure_header)."""
    if len(fields) != 5:
        return Unavailable("the node's core answered an error out of shape; retry")
    status, problem, detail, headers, no_effect = fields
    if (isinstance(status, int) and isinstance(problem, str) and isinstance(detail, str)
            and isinstance(headers, dict) and all(_is_failure_header(k, v) for k, v in headers.items())
            and isinstance(no_effect, bool)):
        error = error_from_problem(status, problem, detail, headers, no_effect=no_effect)
        if error is not None:
            return error
    return Unavailable("the node's core answered an error this worker does not know; retry")
