"""What a node's core process answers to its HTTP workers over the channel (tokenvault.api.channel).

Each call names one NodeService operation and carries its arguments as a map;
the arguments are checked here exactly as a forwarded request's are (a worker
is the node's own process, but what it passes on is still a client's request),
then the service runs as it would for the single process. Backups stream
through ``backup.open`` / ``backup.read`` / ``backup.close``; ``metrics`` answers
the whole node's exposition, the core's registry and every worker's together.

A backup stream belongs to the channel that opened it: only that channel reads
or closes it, and it is closed when that channel closes (its worker died or was
restarted) or, when the open finishes after its caller gave up (the client hung
up while the checkpoint was taken), at once. The node's bound on streams
(``max_backup_streams``) counts the streams being opened as well as those open,
so two workers opening at once cannot both pass it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from tokenvault import auth
from tokenvault.api.channel import MAX_CONCURRENT_CALLS, Channel, ServedCall, current_call, encode_failure
from tokenvault.api.service import (NodeService, _actor, _optional_idempotency_key, _principal, _strings)
from tokenvault.api.validation import (SEALED_TOKENIZE_MEMBERS, require_item_list, validate_epoch,
                                       validate_lookup_epoch, validate_lookup_tokens,
                                       validate_sealed_tokenize, validate_tokens, validate_values)
from tokenvault.config import LimitsConfig
from tokenvault.core.backup import BackupBusy, BackupStream
from tokenvault.core.commands import AUDIT_HASH_BYTES, Actor, CommandError
from tokenvault.core.store_layout import MAX_TOKEN_PAGE
from tokenvault.errors import InvalidRequest, NotFound, Overloaded, ServiceError, Unavailable
from tokenvault.logs import get_logger
from tokenvault.metrics import METRICS_MAX_AGE_SECONDS, Metrics, RecentRender

log = get_logger("core_calls")

# How long the core waits for one worker's metrics before it renders the node's without them.
WORKER_METRICS_TIMEOUT_SECONDS = 1.0
# Read points one read_points call may carry (a worker sends at most this many a call), and read points
# of all workers run at once, past which a call is refused as an overload: the same bound as the channel's
# on calls served at once (tokenvault.api.channel.MAX_CONCURRENT_CALLS), which bounded points before
# they were merged. Of these, one worker's channel runs at most MAX_READ_POINTS_IN_FLIGHT // W (W workers,
# at least one point): CoreCalls._read_points.
MAX_READ_POINTS = MAX_CONCURRENT_CALLS
MAX_READ_POINTS_IN_FLIGHT = MAX_CONCURRENT_CALLS
MAX_AUDIT_LIMIT = 10_000
MAX_CHUNK_BYTES = 4 * 1024 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def _members(arguments: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    if set(arguments) != set(names):
        raise InvalidRequest(f"a worker call must carry exactly {list(names)}")
    return arguments


def _int(value: object, name: str, minimum: int, maximum: int) -> int:
    if type(value) is not int or not minimum <= value <= maximum:
        raise InvalidRequest(f"{name} must be an integer in [{minimum}, {maximum}]")
    return value


def _key_id(arguments: dict[str, Any]) -> str | None:
    """The runtime key id a worker call names (None: a bootstrap key), which the service checks again."""
    key_id = arguments["key_id"]
    if key_id is not None and (type(key_id) is not str or not auth.RUNTIME_KEY_ID_PATTERN.match(key_id)):
        raise InvalidRequest("key_id must be a runtime key id or null")
    return key_id


class CoreCalls:
    """The core's side of every worker channel: ``handlers`` for a Channel, plus the backup streams open."""

    def __init__(self, service: NodeService, metrics: Metrics, workers: Callable[[], list[tuple[str, Channel]]],
                 *, max_backup_streams: int, worker_count: int = 1, requests_in_flight: int = 0) -> None:
        self._service = service
        self._metrics = metrics
        self._workers = workers
        # Half the age: each worker keeps the page it relays for the other half (tokenvault.api.http).
        self._exposition = RecentRender(self._render_node_exposition, METRICS_MAX_AGE_SECONDS / 2)
        self._read_points_in_flight = 0
        # Each worker's channel runs at most its share of the read points (_read_points): one worker that
        # takes all it may still leaves every other worker its own.
        # At least the requests one worker may work on at once (its share of ``requests_in_flight``, [http]
        # max_inflight_requests), one read point each, so that a working worker is never refused below the
        # node's bound: that share can be the larger one where max_inflight_requests is set above 4,096.
        count = max(1, worker_count)
        self._read_points_share = min(MAX_READ_POINTS_IN_FLIGHT,
                                      max(1, MAX_READ_POINTS_IN_FLIGHT // count, -(-requests_in_flight // count)))
        self._read_points_of: dict[Channel | None, int] = {}
        self._limits = service.node.config.limits
        self._max_backup_streams = max_backup_streams
        # Each open stream with the call that opened it (its channel; None: a handler called outside one).
        self._backups: dict[int, tuple[BackupStream, ServedCall | None]] = {}
        self._backups_opening = 0  # opens under way: they hold a place under max_backup_streams
        self._backup_ids = itertools.count(1)
        self._watched_channels: set[Channel] = set()  # channels whose close closes their streams
        self._closing_streams: set[asyncio.Task[None]] = set()

    @property
    def limits(self) -> LimitsConfig:
        """The node's [limits], which bound the channel's frames (tokenvault.api.channel.max_frame_bytes)."""
        return self._limits

    @property
    def handlers(self) -> dict[str, Handler]:
        return {
            "tokenize": self._tokenize, "tokenize_sealed": self._tokenize_sealed,
            "detokenize": self._detokenize, "read_points": self._read_points,
            "reveal": self._reveal, "rotate_epoch": self._rotate_epoch,
            "list_epochs": self._list_epochs, "create_key": self._create_key, "revoke_key": self._revoke_key,
            "list_keys": self._list_keys, "audit_page": self._audit_page, "cluster_view": self._cluster_view,
            "health": self._health, "delete_tokens": self._delete_tokens, "retokenize": self._retokenize,
            "epoch_tokens": self._epoch_tokens, "destroy_epoch": self._destroy_epoch, "trim_audit": self._trim_audit,
            "list_members": self._list_members, "change_member": self._change_member,
            "metrics": self._render_metrics, "backup.open": self._backup_open,
            "backup.read": self._backup_read, "backup.close": self._backup_close,
            "flush_store": self._flush_store,
        }

    def api_key_rows(self) -> list[list[Any]]:
        """The runtime key table as the workers are sent it (ids, names, scopes, salts, digests)."""
        return [[key.key_id, key.name, sorted(key.scopes), key.salt, key.digest, key.created_at_ms, key.created_by]
                for key in self._service.node.store.api_keys()]

    def active_epoch_keys(self) -> dict[str, Any]:
        """The active epoch and its derived token, data and format keys, as the workers are sent them:
        what the sealer gets plus the FF1 key of card and digits tokens (never the master key or an
        epoch secret), for the active epoch only; and under ``"readable"`` every epoch's [epoch, token
        key, data key] that this node can decrypt (a destroyed epoch is not among them), for the
        detokenizes and reveals a worker answers from its view of the store."""
        node = self._service.node
        readable = [[epoch, *node.keyring.get(epoch).derived_keys()] for epoch in node.keyring.epochs()]
        epoch = node.store.active_epoch()
        if epoch == 0 or epoch not in node.keyring:
            return {"epoch": 0, "readable": readable}
        keys = node.keyring.get(epoch)
        token_key, data_key = keys.derived_keys()
        return {"epoch": epoch, "token_key": token_key, "data_key": data_key,
                "format_key": keys.derived_format_key(), "readable": readable}

    # ------------------------------------------------------------------ the vault
    async def _tokenize(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("principal", "values", "idempotency_key", "token_format", "metadata_json",
                             "ttl_seconds"))
        values = validate_values(require_item_list(arguments, "values", self._limits), self._limits)
        # The version 2 options are checked by the service itself (validate_options), as for a forward.
        return await self._service.tokenize(_principal(arguments), values, _optional_idempotency_key(arguments),
                                            arguments["token_format"], arguments["metadata_json"],
                                            arguments["ttl_seconds"])

    async def _reveal(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("tokens", "actor", "epoch", "include_metadata", "masked"))
        tokens = validate_lookup_tokens(require_item_list(arguments, "tokens", self._limits))
        include_metadata, masked = arguments["include_metadata"], arguments["masked"]
        if not isinstance(include_metadata, bool) or not isinstance(masked, bool):
            raise InvalidRequest("include_metadata and masked must be booleans")
        return await self._service.reveal(tokens, _checked_actor(arguments["actor"]),
                                          validate_lookup_epoch(arguments["epoch"]), include_metadata, masked)

    async def _tokenize_sealed(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, SEALED_TOKENIZE_MEMBERS)
        sealed = validate_sealed_tokenize(arguments, self._limits)
        return await self._service.tokenize_sealed(_principal(arguments), sealed.epoch, sealed.values, sealed.items,
                                                   sealed.options, sealed.metadata)

    async def _detokenize(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("tokens", "actor"))
        tokens = validate_tokens(require_item_list(arguments, "tokens", self._limits))
        return await self._service.detokenize(tokens, _checked_actor(arguments["actor"]))

    async def _read_points(self, arguments: dict[str, Any]) -> Any:
        """The read points one worker needed in one loop turn (tokenvault.api.merge.ReadPointMerger), each
        run as it would be alone; one result per point: ``[index]`` or its error as the channel carries
        one (``encode_failure``).

        At most MAX_READ_POINTS_IN_FLIGHT points run at once in the core, and at most an even share of them
        (that bound over the node's workers, at least one) for one worker's channel; a call that would pass
        either is refused whole as an overload (503, no effect). A fixed share, not one that grows while
        the others are idle: a worker that took the idle ones' shares would hold them for as long as its
        reads wait, and the others' reads would be refused meanwhile. A working worker needs no more than
        its share: it works on its share of [http] max_inflight_requests (256 by default) at once, one read
        point a request."""
        _members(arguments, ("points",))
        points = arguments["points"]
        if not isinstance(points, list) or not 1 <= len(points) <= MAX_READ_POINTS:
            raise InvalidRequest(f"points must be a list of 1 to {MAX_READ_POINTS} read points")
        # Every point is checked before any runs: a malformed call changes nothing (no audit record).
        runs = [self._read_point(point) for point in points]
        call = current_call()
        channel = None if call is None else call.channel
        held = self._read_points_of.get(channel, 0)
        if self._read_points_in_flight + len(runs) > MAX_READ_POINTS_IN_FLIGHT:
            raise Overloaded("the node's core is answering as many read points as it takes; retry")
        if channel is not None and held + len(runs) > self._read_points_share:
            raise Overloaded("the node's core is answering as many read points of this worker as one worker "
                             "may have at once; retry")
        self._read_points_in_flight += len(runs)
        self._read_points_of[channel] = held + len(runs)
        try:
            results = await asyncio.gather(*(run() for run in runs), return_exceptions=True)
        finally:
            self._read_points_in_flight -= len(runs)
            left = self._read_points_of[channel] - len(runs)
            if left:
                self._read_points_of[channel] = left
            else:
                del self._read_points_of[channel]  # a closed channel's entry does not outlive its points
        answers: list[list[Any]] = []
        for result in results:
            if isinstance(result, ServiceError):
                answers.append(encode_failure(result))
            elif isinstance(result, BaseException):
                raise result  # a bug, not a point's answer: the whole call fails as any call would
            else:
                answers.append([result])
        return answers

    def _read_point(self, point: object) -> Callable[[], Awaitable[int]]:
        """One checked read point, ready to run."""
        if not isinstance(point, dict) or point.get("kind") not in ("tokenize", "detokenize"):
            raise InvalidRequest("a read point is a map whose kind is tokenize or detokenize")
        if point["kind"] == "tokenize":
            _members(point, ("kind", "epoch", "items"))
            epoch = validate_epoch(point["epoch"])
            _int(point["items"], "items", 1, self._limits.max_items)
            return lambda: self._service.tokenize_read_point(epoch)
        _members(point, ("kind", "items", "found", "actor", "masked", "active_epoch", "metadata"))
        items = _int(point["items"], "items", 1, self._limits.max_items)
        found = _int(point["found"], "found", 0, items)
        masked, active_epoch, metadata = point["masked"], point["active_epoch"], point["metadata"]
        if not isinstance(masked, bool) or not isinstance(metadata, bool):
            raise InvalidRequest("masked and metadata must be booleans")
        actor = _checked_actor(point["actor"])
        checked_epoch = None if active_epoch is None else validate_epoch(active_epoch)
        return lambda: self._service.detokenize_read_point(items, found, actor, masked=masked,
                                                           active_epoch=checked_epoch, metadata=metadata)

    async def _rotate_epoch(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("principal", "idempotency_key", "actor"))
        return await self._service.rotate_epoch(_principal(arguments), _optional_idempotency_key(arguments),
                                                _checked_actor(arguments["actor"]))

    async def _list_epochs(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("key_id",))
        return await self._service.list_epochs(_key_id(arguments))

    async def _create_key(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("name", "scopes", "actor"))
        name = arguments["name"]
        if not isinstance(name, str):
            raise InvalidRequest("name must be a string")
        try:
            scopes = _strings(arguments["scopes"])
        except TypeError:
            raise InvalidRequest("scopes must be a list of strings") from None
        return await self._service.create_key(name, scopes, _checked_actor(arguments["actor"]))

    async def _revoke_key(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("key_id", "actor"))
        if not isinstance(arguments["key_id"], str):
            raise InvalidRequest("key_id must be a string")
        return await self._service.revoke_key(arguments["key_id"], _checked_actor(arguments["actor"]))

    async def _delete_tokens(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("tokens", "epoch", "actor"))
        tokens = validate_lookup_tokens(require_item_list(arguments, "tokens", self._limits))
        return await self._service.delete_tokens(tokens, _checked_actor(arguments["actor"]),
                                                 validate_lookup_epoch(arguments["epoch"]))

    async def _retokenize(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("tokens", "epoch", "actor"))
        tokens = validate_lookup_tokens(require_item_list(arguments, "tokens", self._limits))
        return await self._service.retokenize(tokens, _checked_actor(arguments["actor"]),
                                              validate_lookup_epoch(arguments["epoch"]))

    async def _epoch_tokens(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("epoch", "after", "limit", "key_id"))
        after = arguments["after"]
        if after is not None and (not isinstance(after, str) or not validate_lookup_tokens([after])):
            raise InvalidRequest("after must be a token or null")
        return await self._service.epoch_tokens(validate_epoch(arguments["epoch"]), after,
                                                _int(arguments["limit"], "limit", 1, MAX_TOKEN_PAGE),
                                                _key_id(arguments))

    async def _destroy_epoch(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("epoch", "actor"))
        return await self._service.destroy_epoch(validate_epoch(arguments["epoch"]),
                                                 _checked_actor(arguments["actor"]))

    async def _trim_audit(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("through_seq", "through_hash", "actor"))
        through_hash = arguments["through_hash"]
        if not isinstance(through_hash, bytes) or len(through_hash) != AUDIT_HASH_BYTES:
            raise InvalidRequest(f"through_hash must be {AUDIT_HASH_BYTES} bytes")
        return await self._service.trim_audit(_int(arguments["through_seq"], "through_seq", 1, 2**63 - 1),
                                              through_hash, _checked_actor(arguments["actor"]))

    async def _list_members(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("key_id",))
        return await self._service.list_members(_key_id(arguments))

    async def _change_member(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("action", "node_id", "peer_addr", "key_id"))
        key_id = _key_id(arguments)
        # The service checks the other three (validate_member_change) before anything else.
        return await self._service.change_member(arguments["action"], arguments["node_id"], arguments["peer_addr"],
                                                 key_id)

    async def _list_keys(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("key_id",))
        return await self._service.list_keys(_key_id(arguments))

    async def _audit_page(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("after", "limit"))
        return await self._service.audit_page(_int(arguments["after"], "after", 0, 2**63 - 1),
                                              _int(arguments["limit"], "limit", 1, MAX_AUDIT_LIMIT))

    async def _cluster_view(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ())
        return await self._service.cluster_view()

    async def _health(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ())
        return self._service.health()

    async def _flush_store(self, arguments: dict[str, Any]) -> Any:
        """A worker's view is far behind after a write burst: flush the memtable rather than have it
        replay the WAL (Node.flush_store_for_views); whether a flush is under way."""
        _members(arguments, ())
        return await self._service.node.flush_store_for_views()

    # ------------------------------------------------------------------ backups
    async def _backup_open(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ())
        if self.backup_streams_open >= self._max_backup_streams:
            raise BackupBusy(self._max_backup_streams)  # 503 backup-busy, Retry-After 5, as on a one-process node
        call = current_call()
        # The place is held from before the checkpoint is taken to the stream's registration (or failure).
        self._backups_opening += 1
        try:
            # Cancelled (the channel closed while the checkpoint was taken), BackupStream.open removes it.
            stream = await self._service.open_backup()
        finally:
            self._backups_opening -= 1
        if call is not None and call.caller_gone:
            # Nobody will read or close it: the request was cancelled or the worker went away meanwhile.
            self._close_stream_later(stream)
            raise Unavailable("the backup request went away while its checkpoint was taken")
        stream_id = next(self._backup_ids)
        self._backups[stream_id] = (stream, call)
        if call is not None:
            # A cancel that crosses this answer: the worker never learns the stream's id, so never closes it.
            call.on_abandon(lambda: self._drop_stream(stream_id))
            channel = call.channel
            if channel not in self._watched_channels:
                self._watched_channels.add(channel)
                channel.on_close(lambda: self._close_backups_of(channel))
        return {"id": stream_id, "index": stream.index, "view": stream.view, "total_bytes": stream.total_bytes}

    def _own_stream(self, stream_id: object) -> BackupStream:
        """The open stream ``stream_id`` of the calling channel; NotFound for another channel's."""
        entry = self._backups.get(stream_id) if type(stream_id) is int else None
        call = current_call()
        if entry is None or (call is not None and (entry[1] is None or entry[1].channel is not call.channel)):
            raise NotFound("no such backup stream")
        return entry[0]

    async def _backup_read(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("id", "offset", "length"))
        stream = self._own_stream(arguments["id"])
        offset = _int(arguments["offset"], "offset", 0, stream.total_bytes)
        length = _int(arguments["length"], "length", 1, MAX_CHUNK_BYTES)
        return await stream.read(offset, min(length, stream.total_bytes - offset))

    async def _backup_close(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ("id",))
        try:
            stream = self._own_stream(arguments["id"])
        except NotFound:
            return None
        _, opened_by = self._backups.pop(arguments["id"])
        if opened_by is not None:
            opened_by.forget_abandon()
        await stream.close()
        return None

    def _drop_stream(self, stream_id: int) -> None:
        entry = self._backups.pop(stream_id, None)
        if entry is not None:
            self._close_stream_later(entry[0])

    def _close_backups_of(self, channel: Channel) -> None:
        """``channel`` closed (its worker died or is being replaced): its streams free their places now."""
        self._watched_channels.discard(channel)
        for stream_id, (_, opened_by) in list(self._backups.items()):
            if opened_by is not None and opened_by.channel is channel:
                self._drop_stream(stream_id)

    def _close_stream_later(self, stream: BackupStream) -> None:
        task = asyncio.get_running_loop().create_task(stream.close())
        self._closing_streams.add(task)
        task.add_done_callback(self._closing_streams.discard)

    @property
    def backup_streams_open(self) -> int:
        """The streams open, being opened, or being closed behind their callers (a worker gone, a request
        cancelled): each holds a checkpoint of the store on disk until its close ends, so each holds its
        place among max_backup_streams until then."""
        return len(self._backups) + self._backups_opening + len(self._closing_streams)

    async def close_backups(self) -> None:
        streams, self._backups = [stream for stream, _ in self._backups.values()], {}
        for stream in streams:
            await stream.close()
        await asyncio.gather(*self._closing_streams, return_exceptions=True)

    # ------------------------------------------------------------------ metrics
    async def _render_metrics(self, arguments: dict[str, Any]) -> Any:
        _members(arguments, ())
        return (await self._exposition.get()).decode("utf-8")

    async def _render_node_exposition(self) -> bytes:
        """The core's registry and every worker's, merged: rendered at most once per half of
        METRICS_MAX_AGE_SECONDS for all the workers that ask (each asks for its own scrapes)."""
        core_text, _ = self._metrics.render()
        parts: list[tuple[str | None, str]] = [(None, core_text.decode("utf-8"))]
        workers = self._workers()

        async def one(name: str, channel: Channel) -> tuple[str | None, str] | None:
            try:
                text = await asyncio.wait_for(channel.call("metrics", {}), WORKER_METRICS_TIMEOUT_SECONDS)
            except Exception:  # a worker that is restarting is left out of this scrape
                return None
            return (name, text) if isinstance(text, str) else None

        answers = await asyncio.gather(*(one(name, channel) for name, channel in workers))
        parts.extend(answer for answer in answers if answer is not None)
        return merge_expositions(parts)


def _checked_actor(fields: object) -> Actor:
    try:
        return _actor(fields)
    except (CommandError, TypeError):
        raise InvalidRequest("the actor is malformed") from None


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_expositions(parts: Sequence[tuple[str | None, str]]) -> bytes:
    """One Prometheus exposition from several: each worker's samples gain the label ``worker``. A worker's
    text that does not parse is left out (logged, by worker and error type), as a worker that does not
    answer is: what one worker sends never fails the node's exposition for every other."""
    families: dict[str, Metric] = {}
    for worker, text in parts:
        try:
            parsed = list(text_string_to_metric_families(text))
        except Exception as error:  # the core's own text always parses: only a worker's is refused
            if worker is None:
                raise
            log.error("metrics.worker_exposition_refused", worker=worker, error_type=type(error).__name__)
            continue
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = dict(sample.labels)
                if worker is not None:
                    labels["worker"] = worker
                merged.samples.append(Sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
