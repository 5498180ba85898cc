"""The service as an HTTP worker process sees it: every operation is a call to the node's core.

``RemoteService`` has the methods the HTTP layer (tokenvault.api.http) calls on
a NodeService, and runs each as a channel call (tokenvault.api.channel) that
the core answers with its own NodeService (tokenvault.api.core_calls). Errors
come back as the same ServiceError class, so a worker answers exactly what the
single process would. The runtime key table lives here too, as the core last
pushed it: authentication never waits for the core, and a revoke reaches every
worker as soon as the core applies it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from tokenvault import auth
from tokenvault.api.channel import MAX_CONCURRENT_CALLS, Channel
from tokenvault.api.merge import ReadPointMerger, SealedMerger
from tokenvault.core import commands
from tokenvault.core.backup import BACKUP_CHUNK_BYTES
from tokenvault.crypto import formats
from tokenvault.core.store_reader import CatchUp, StoreReadError, StoreReader
from tokenvault.crypto.keys import DecryptError, EpochKeys
from tokenvault.errors import EpochChanged, Outcome, ServiceError, Unavailable, revoked_key
from tokenvault.logs import SummedEvent, get_logger
from tokenvault.metrics import Metrics
from tokenvault.crypto.tokens import is_token, parse_token

log = get_logger("worker")
# Damaged stored bytes read as unknown and are said loudly, but summed: one detokenize of many damaged
# tokens, or a client asking for them again and again, makes a line a second per epoch, not one per token.
CIPHERTEXT_CORRUPT = SummedEvent(log, "store.ciphertext_corrupt", ("epoch",), level="error")
METADATA_CORRUPT = SummedEvent(log, "store.metadata_corrupt", ("epoch",), level="error")

# After its view of the store failed, a worker sends every detokenize to the core for this long.
READER_REST_SECONDS = 5.0
# Plain tokenizes the view could not answer in a row before a worker tries it for only one in PROBE_EVERY.
PROBE_AFTER_MISSES = 64
PROBE_EVERY = 16
# How often at most such a sampled try makes the view catch up (a view then lags by at most this much).
SAMPLED_NUDGE_INTERVAL_SECONDS = 0.5

# The node's per-request bound of values when the caller does not give it (limits.max_items).
DEFAULT_MAX_ITEMS = 1000

KEYS_TOPIC = "keys"
EPOCH_TOPIC = "epoch"
CATCH_UP_TOPIC = "catch_up"
# The core reloaded its certificate files (SIGHUP): the worker loads them into its HTTPS context too.
TLS_TOPIC = "tls"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _token_epoch(token: str) -> int:
    """The epoch of a token the HTTP layer validated already (``tv<epoch>_<body>``): a slice, not the
    grammar's regular expression, which costs a microsecond a token."""
    try:
        return int(token[2:token.index("_", 2)])
    except ValueError:
        return parse_token(token).epoch


def _unexpected() -> Unavailable:
    return Unavailable("the node's core answered out of shape; retry")


def _outcome(result: object) -> Outcome:
    if not isinstance(result, Outcome):
        raise _unexpected()
    return result


def _document(result: object) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise _unexpected()
    return result


def _decode_epoch_keys(payload: object) -> EpochKeys | None:
    """The active epoch's keys from the core's push; None (the core seals) when there is none or it is
    malformed. Without a format key the worker seals opaque tokens only."""
    if not isinstance(payload, dict) or payload.get("epoch") == 0:
        return None
    epoch, token_key, data_key = payload.get("epoch"), payload.get("token_key"), payload.get("data_key")
    format_key = payload.get("format_key")
    if (type(epoch) is not int or not isinstance(token_key, bytes) or not isinstance(data_key, bytes)
            or not (format_key is None or isinstance(format_key, bytes))):
        log.error("worker.epoch_keys_refused")
        return None
    try:
        return EpochKeys.from_derived_keys(epoch, token_key, data_key, format_key)
    except ValueError:
        log.error("worker.epoch_keys_refused")
        return None


def _decode_readable_keys(payload: object) -> dict[int, EpochKeys]:
    """Every epoch's keys this node can decrypt, from the core's push; empty (every detokenize goes to the
    core) when they are missing or malformed."""
    rows = payload.get("readable") if isinstance(payload, dict) else None
    keys: dict[int, EpochKeys] = {}
    if not isinstance(rows, list):
        log.error("worker.epoch_keys_refused")
        return keys
    for row in rows:
        if (not isinstance(row, list) or len(row) != 3 or type(row[0]) is not int
                or not isinstance(row[1], bytes) or not isinstance(row[2], bytes)):
            log.error("worker.epoch_keys_refused")
            return {}
        try:
            keys[row[0]] = EpochKeys.from_derived_keys(row[0], row[1], row[2])
        except ValueError:
            log.error("worker.epoch_keys_refused")
            return {}
    return keys


def decode_key_rows(rows: object) -> dict[str, auth.RuntimeKey]:
    """The runtime key table from the core's push (``CoreCalls.api_key_rows``); ValueError if malformed."""
    if not isinstance(rows, list):
        raise ValueError("the key table is not a list")
    keys: dict[str, auth.RuntimeKey] = {}
    for row in rows:
        if not isinstance(row, list) or len(row) != 7:
            raise ValueError("a key row out of shape")
        key_id, name, scopes, salt, digest, created_at_ms, created_by = row
        if not (isinstance(key_id, str) and isinstance(name, str) and isinstance(scopes, list)
                and all(isinstance(scope, str) for scope in scopes) and isinstance(salt, bytes)
                and isinstance(digest, bytes) and isinstance(created_at_ms, int) and isinstance(created_by, str)):
            raise ValueError("a key row of the wrong types")
        keys[key_id] = auth.RuntimeKey(key_id=key_id, name=name, scopes=frozenset(scopes), salt=salt,
                                       digest=digest, created_at_ms=created_at_ms, created_by=created_by)
    return keys


def _seal_request(keys: EpochKeys, values: list[str], token_format: str,
                  metadata_json: str | None) -> tuple[list[list[Any]], list[bytes] | None] | None:
    """A tokenize's [token, ciphertext] pairs in ``keys``' epoch, and its metadata sealed per token (None
    without metadata), as ``NodeService.tokenize_sealed`` takes them; the values of a card or digits
    request are normalized first, as the core would. None when the core should seal instead: keys
    without a format key, or a value that does not fit the format (the core answers its 422, naming
    the position)."""
    if token_format == formats.OPAQUE:
        pairs = keys.seal_many(values)
    else:
        if not keys.seals_formats:
            return None
        try:
            normalized = [formats.normalize(token_format, value) for value in values]
        except formats.FormatError:
            return None
        pairs = [keys.seal_format(token_format, value) for value in normalized]
    metadata = None
    if metadata_json is not None:
        document = metadata_json.encode("utf-8")
        metadata = [keys.encrypt_metadata(token, document) for token, _ in pairs]
    return [[token, ciphertext] for token, ciphertext in pairs], metadata


class RemoteService:
    """NodeService's operations, answered by the node's core process over ``channel``."""

    def __init__(self, node_id: str, channel: Channel | None = None, *, reader: StoreReader | None = None,
                 metrics: Metrics | None = None, timeout_seconds: float = 5.0,
                 max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self.node_id = node_id
        self.channel = channel
        # The plain sealed tokenizes of one loop turn go to the core as one call (tokenvault.api.merge);
        # at most the node's per-request bound of values, so a merged call is one allowed request, and at
        # most what the channel's frame bound carries (_merged_call_bytes).
        self.merger = SealedMerger(self._send_sealed, max_items, self._merged_call_bytes)
        # Likewise the read points of a turn: one read_points call (tokenvault.api.merge.ReadPointMerger).
        # At most the points the core takes in one call (tokenvault.api.core_calls.MAX_READ_POINTS).
        self.read_points = ReadPointMerger(self._send_read_points, MAX_CONCURRENT_CALLS)
        self._keys: dict[str, auth.RuntimeKey] = {}
        self.keys_ready = asyncio.Event()
        # The active epoch's keys as the core last pushed them (None before the first epoch): this
        # worker seals the values of tokenize requests without an Idempotency-Key in it.
        self._epoch_keys: EpochKeys | None = None
        # Every epoch's keys the core can decrypt, and this worker's read-only view of the store: a
        # detokenize of tokens the view holds is answered here (``detokenize``).
        self._readable: dict[int, EpochKeys] = {}
        self._reader: StoreReader | None = None
        self._catch_up: CatchUp | None = None
        if reader is not None:
            self.attach_view(reader)
        self._reader_resting_until = 0.0
        # Plain tokenizes in a row the view could not answer, and those not tried since (_probe_view).
        self._view_misses = 0
        self._probes_skipped = 0
        self._metrics = metrics
        self._timeout_seconds = timeout_seconds

    def on_push(self, topic: str, payload: object) -> None:
        if topic == CATCH_UP_TOPIC:
            if self._catch_up is not None:
                self._catch_up.catch_up_soon()
            return
        if topic == EPOCH_TOPIC:
            self._epoch_keys = _decode_epoch_keys(payload)
            self._readable = _decode_readable_keys(payload)
            return
        if topic != KEYS_TOPIC:
            return
        try:
            self._keys = decode_key_rows(payload)
        except ValueError as error:
            # Keeping the previous table could keep a revoked key alive: refuse every runtime key instead.
            log.error("worker.key_table_refused", error=str(error))
            self._keys = {}
        self.keys_ready.set()

    def api_key(self, key_id: str) -> auth.RuntimeKey | None:
        return self._keys.get(key_id)

    def _refuse_revoked_principal(self, principal: str) -> None:
        """401 when a tokenize this worker answered from its view comes from a runtime key its table no
        longer holds. The core pushes every change of the table before it answers the read point (pushes
        precede answers on the channel), so by then the table holds every revocation acknowledged before
        the request started, as the core's own check does (NodeService._refuse_revoked_principal)."""
        key_id = auth.runtime_key_id_of_identity(principal)
        if key_id is not None and key_id not in self._keys:
            raise revoked_key()

    async def _call(self, method: str, arguments: dict[str, Any]) -> Any:
        if self.channel is None:
            raise Unavailable("this worker is not connected to its node's core yet; retry", no_effect=True)
        return await self.channel.call(method, arguments)

    async def read_health(self) -> dict[str, Any]:
        return _document(await self._call("health", {}))

    async def tokenize(self, principal: str, values: list[str], idempotency_key: str | None,
                       token_format: str = formats.OPAQUE, metadata_json: str | None = None,
                       ttl_seconds: int | None = None) -> Outcome:
        keys = self._epoch_keys
        sealed = None
        if idempotency_key is None and keys is not None:
            sealed = _seal_request(keys, values, token_format, metadata_json)
        if sealed is not None and keys is not None:
            # Sealed here, on this worker's core; the core checks the epoch and one value, and
            # answers EpochChanged after a rotation this worker has not heard of yet. The expiry
            # time is the core's (its clock, carried in the entry): only ttl_seconds goes.
            items, metadata = sealed
            plain = token_format == formats.OPAQUE and metadata_json is None and ttl_seconds is None
            if plain and self._view_ready() and self._probe_view():
                answered = await self._tokenize_from_view(keys.epoch, items)
                if answered is not None:
                    self._view_misses = 0
                    self._refuse_revoked_principal(principal)
                    return answered
                self._view_misses += 1
            try:
                if plain:
                    return await self.merger.submit(principal, keys.epoch, values, items)
                return _outcome(await self._call("tokenize_sealed", {
                    "principal": principal, "epoch": keys.epoch, "values": values, "items": items,
                    "token_format": token_format, "metadata_json": metadata_json, "ttl_seconds": ttl_seconds,
                    "metadata": metadata}))
            except EpochChanged:
                pass
        return _outcome(await self._call("tokenize", {
            "principal": principal, "values": values, "idempotency_key": idempotency_key,
            "token_format": token_format, "metadata_json": metadata_json, "ttl_seconds": ttl_seconds}))

    @property
    def view(self) -> StoreReader | None:
        """This worker's view of the store, once it has one (attach_view)."""
        return self._reader

    def attach_view(self, reader: StoreReader) -> None:
        """Read from ``reader`` from now on (a worker opens its view once it serves: tokenvault.api.worker)."""
        self._reader = reader
        self._catch_up = CatchUp(reader, ask_flush=self.ask_flush)

    async def ask_flush(self) -> bool:
        """Ask the core to flush the store's memtable, for this worker's view (CatchUp)."""
        return await self._call("flush_store", {}) is True

    def _merged_call_bytes(self) -> int | None:
        """The bytes a merged tokenize_sealed call may take: the channel's frame bound (SealedMerger counts
        its other members and headers too)."""
        return None if self.channel is None else self.channel.max_frame_bytes

    async def _send_read_points(self, points: list[dict[str, Any]]) -> Any:
        return await self._call("read_points", {"points": points})

    async def _send_sealed(self, principal: str, epoch: int, values: list[str], items: list[list[Any]]) -> Outcome:
        """One tokenize_sealed call for the plain requests SealedMerger merged."""
        return _outcome(await self._call("tokenize_sealed", {
            "principal": principal, "epoch": epoch, "values": values, "items": items,
            "token_format": formats.OPAQUE, "metadata_json": None, "ttl_seconds": None, "metadata": None}))

    async def _tokenize_from_view(self, epoch: int, items: list[list[Any]]) -> Outcome | None:
        """A plain tokenize whose every (token, ciphertext) pair this worker's view holds, answered as a read
        without the core touching the store (None: the request takes the usual path, nothing done yet).

        As the core's own read check (NodeService._answer_as_read): the core confirms it is in step with
        the primary (its read barrier, or a backup's read index), so a rotation acknowledged before the
        request started is applied there, checks ``epoch`` is still the active one and returns its last
        removal index; the view catches up to that index when behind it, and every pair must still be
        there (a mapping deleted meanwhile sends the request down the write path, which re-creates it).
        Pairs the view lacks (new values, or values written since the view last moved) nudge the view
        to catch up, at most every NUDGE_INTERVAL_SECONDS, so it follows what clients tokenize again."""
        assert self._catch_up is not None
        tokens = [token for token, _ in items]
        reader = self._reader
        assert reader is not None

        def lookup() -> dict[str, bytes]:
            return reader.lookup(tokens, _now_ms())

        first = self._look_up(lookup)
        if first is None:
            return None
        found, looked_up_at = first
        if len(found) != len(set(tokens)) or any(found[token] != ciphertext for token, ciphertext in items):
            # New values, or values written since the view last moved; while tries are sampled (a
            # stream of new values) a catch-up is worth less, and each replays what the core wrote
            # since the last (a millisecond when nothing was, some 100 ms after 0.5 s of a fill).
            self._catch_up.nudge(SAMPLED_NUDGE_INTERVAL_SECONDS if self._view_misses >= PROBE_AFTER_MISSES
                                 else None)
            return None
        try:
            index = await self.read_points.ask({"kind": "tokenize", "epoch": epoch, "items": len(items)})
        except ServiceError:
            return None  # a rotation, no primary, an overload: the usual path answers as it would
        try:
            still = await self._look_again_at(index, lookup, found, looked_up_at)
        except StoreReadError as error:
            self._rest_reader(error)
            return None
        if len(still) != len(found):
            return None
        if self._metrics is not None:
            self._metrics.record_tokenize_answered_as_read(len(items))
        return Outcome(200, json.dumps({"epoch": epoch, "tokens": tokens}, separators=(",", ":")).encode(), False)

    def _probe_view(self) -> bool:
        """Whether a plain tokenize should try the view first. Under a stream of new values every try
        misses and costs the worker a lookup (about a sixth of its work per request, measured); so
        after PROBE_AFTER_MISSES misses in a row only one in PROBE_EVERY tries, until one is answered.
        A request not tried is no less a read: the core's own read check answers it so."""
        if self._view_misses < PROBE_AFTER_MISSES:
            return True
        self._probes_skipped += 1
        return self._probes_skipped % PROBE_EVERY == 0

    def _view_ready(self) -> bool:
        """Whether reads may try this worker's view (it has one, and it is not resting after a failure)."""
        return self._catch_up is not None and time.monotonic() >= self._reader_resting_until

    async def detokenize(self, tokens: list[str], actor: commands.Actor | None = None) -> list[str | None]:
        """The values of ``tokens``: from this worker's view of the store when it holds every one of them,
        else (or when the view cannot answer) by the core, exactly as the single process answers."""
        actor = actor or commands.NO_ACTOR
        if tokens and self._view_ready():
            read = await self._read_from_view(tokens, tokens, [], None, actor)
            if read is not None:
                self._record_read("view", read[0])
                return read[0]
        result = await self._call("detokenize", {"tokens": tokens, "actor": actor.fields()})
        if not isinstance(result, list) or len(result) != len(tokens) \
                or not all(value is None or isinstance(value, str) for value in result):
            raise _unexpected()
        if self._catch_up is not None:
            self._record_read("core", None)
        return result

    async def reveal(self, tokens: list[str], actor: commands.Actor | None = None, epoch: int | None = None,
                     include_metadata: bool = False, masked: bool = False) -> dict[str, Any]:
        """Detokenize with the version 2 options (NodeService.reveal: card and digits tokens, metadata,
        masked values): from this worker's view when it holds every token, else by the core."""
        actor = actor or commands.NO_ACTOR
        if tokens and self._view_ready():
            document = await self._reveal_from_view(tokens, actor, epoch, include_metadata, masked)
            if document is not None:
                self._record_read("view", document["values"])
                return document
        document = _document(await self._call("reveal", {
            "tokens": tokens, "actor": actor.fields(), "epoch": epoch,
            "include_metadata": include_metadata, "masked": masked}))
        if self._catch_up is not None:
            self._record_read("core", None)
        return document

    async def _reveal_from_view(self, tokens: list[str], actor: commands.Actor, epoch: int | None,
                                include_metadata: bool, masked: bool) -> dict[str, Any] | None:
        """NodeService.reveal's answer from this worker's view, with ``_read_from_view``'s guarantee (None:
        the core answers, nothing written yet). Card and digits tokens carry no epoch: without ``epoch``
        they are resolved in the active one, which is this worker's last pushed epoch if the core, after
        its read barrier, still has it active (else the core answers the request)."""
        opaque: list[str] = []
        formatted: list[str] = []
        for token in tokens:
            (opaque if is_token(token) else formatted).append(token)
        resolve = epoch is None and bool(formatted)
        if resolve:
            keys = self._epoch_keys
            if keys is None:
                return None
            epoch = keys.epoch
        read = await self._read_from_view(tokens, opaque, formatted, epoch, actor, masked=masked, resolve=resolve,
                                          metadata=include_metadata)
        if read is None:
            return None
        values = read[0]
        document: dict[str, Any] = {"values": values}
        if masked:
            document["values"] = [None if value is None else formats.mask_value(value) for value in values]
        if include_metadata:
            try:
                metadata = self._view_metadata(opaque, formatted, epoch, values, tokens)
            except StoreReadError as error:
                self._rest_reader(error)
                self._record_read("failed", None)
                raise Unavailable("this worker's view of the store could not be read; the values were not "
                                  "returned; retry") from None
            document["metadata_json"] = metadata
        return document

    def _view_metadata(self, opaque: list[str], formatted: list[str], epoch: int | None,
                       values: list[str | None], tokens: list[str]) -> list[str | None]:
        """The metadata (canonical JSON text, or None) of each of ``tokens`` whose value was answered,
        read from the view as it stood for those values."""
        assert self._reader is not None
        answered = {token for token, value in zip(tokens, values) if value is not None}
        rows = self._reader.metadata(None, [token for token in opaque if token in answered])
        if epoch is not None and formatted:
            rows.update(self._reader.metadata(epoch, [token for token in formatted if token in answered]))
        texts: dict[str, str | None] = {}
        for token, ciphertext in rows.items():
            keys = self._readable.get(_token_epoch(token) if is_token(token) else epoch or 0)
            if keys is None:
                continue
            try:
                texts[token] = keys.decrypt_metadata(token, ciphertext).decode("utf-8")
            except (DecryptError, UnicodeDecodeError):
                METADATA_CORRUPT.add(1, keys.epoch)
        return [texts.get(token) if token in answered else None for token in tokens]

    async def _read_from_view(self, tokens: list[str], opaque: list[str], formatted: list[str], epoch: int | None,
                              actor: commands.Actor, *, masked: bool = False, resolve: bool = False,
                              metadata: bool = False) -> tuple[list[str | None], dict[str, bytes]] | None:
        """The values of ``tokens`` (``opaque`` ones and card or digits ones of ``epoch``) and the
        ciphertexts they came from, with the read guarantee of a detokenize, kept from a view that may
        lag (docs/guarantees.md):

        1. every token must be in the view (an unknown one may be newer than the view: the core asks the
           primary) and of an epoch this worker can decrypt, else None: the core answers it all;
        2. the core (``detokenize_read_point``) checks ``epoch`` is still the active one when ``resolve``
           (after a read barrier; EpochChanged, nothing written: None), commits the audit record (saying
           "masked" for a masked reveal), applies everything committed before the request started, and
           returns the last index at which it removed or made unreadable any mapping (a delete, a
           destroy, a purge, a snapshot), or with ``metadata`` also set or replaced any metadata;
        3. the view catches up to that index if it is not there yet (seldom: only after a removal), the
           tokens are looked up again (a token deleted meanwhile is null, as the core would answer;
           later entries only add) and decrypted with the epoch keys as of the core's answer (its key
           pushes precede its answers on the channel: a destroyed epoch's keys are gone).
        A view that fails before step 2 leaves the request to the core; after it, the request is
        answered 503 (its audit record is written: asking the core would write a second one)."""
        assert self._catch_up is not None
        reader = self._reader
        assert reader is not None

        def lookup() -> dict[str, bytes]:
            found = reader.lookup(opaque, _now_ms()) if opaque else {}
            if formatted and epoch is not None:
                found.update(reader.lookup_format(epoch, formatted, _now_ms()))
            return found

        first = self._look_up(lookup)
        if first is None:
            return None
        found, looked_up_at = first
        if len(found) != len(set(tokens)):
            self._catch_up.nudge()  # the view may lag the tokens clients are being given: freshen it
            return None
        epochs = {token: _token_epoch(token) for token in opaque}
        if formatted and epoch is not None:
            epochs.update((token, epoch) for token in formatted)
        if any(token_epoch not in self._readable for token_epoch in epochs.values()):
            return None
        try:
            index = await self.read_points.ask({
                "kind": "detokenize", "items": len(tokens), "found": len(tokens), "actor": actor.fields(),
                "masked": masked, "active_epoch": epoch if resolve else None, "metadata": metadata})
        except EpochChanged:
            return None  # a rotation this worker has not heard of yet: nothing was written, the core answers
        try:
            still = await self._look_again_at(index, lookup, found, looked_up_at)
        except StoreReadError as error:
            self._rest_reader(error)
            self._record_read("failed", None)
            raise Unavailable("this worker's view of the store did not catch up; the values were not "
                              "returned; retry") from None
        values: list[str | None] = []
        for token in tokens:
            ciphertext = still.get(token)
            keys = self._readable.get(epochs[token]) if ciphertext is not None else None
            if ciphertext is None or keys is None:
                values.append(None)
                continue
            try:
                values.append(keys.decrypt(token, ciphertext))
            except DecryptError:
                CIPHERTEXT_CORRUPT.add(1, keys.epoch)
                values.append(None)
        return values, still

    def _look_up(self, lookup: Callable[[], dict[str, bytes]]) -> tuple[dict[str, bytes], int] | None:
        """What ``lookup`` finds in the view and the index the view shows; None (and the view rests) if it
        fails."""
        assert self._reader is not None
        try:
            return lookup(), self._reader.applied_index
        except StoreReadError as error:
            self._rest_reader(error)
            return None

    async def _look_again_at(self, index: object, lookup: Callable[[], dict[str, bytes]], found: dict[str, bytes],
                             looked_up_at: int) -> dict[str, bytes]:
        """What ``lookup`` finds in the view once it has applied ``index`` (the core's removal index),
        ``found`` being what it found at ``looked_up_at``: the same when the view did not move and
        holds no expiry (only a catch-up, or the clock for a mapping with a life, changes a lookup).
        StoreReadError when the view cannot get there in time."""
        reader, catch_up = self._reader, self._catch_up
        assert reader is not None and catch_up is not None
        if type(index) is not int or index < 0:
            raise _unexpected()
        await catch_up.wait_applied(index, self._timeout_seconds)
        if reader.applied_index == looked_up_at and not reader.has_life:
            return found
        return lookup()

    def _rest_reader(self, error: StoreReadError) -> None:
        """After a view failure every detokenize goes to the core for a while; the view reopens on its
        next catch-up."""
        log.warning("worker.store_view_failed", error=str(error)[:200])
        self._reader_resting_until = time.monotonic() + READER_REST_SECONDS

    def _record_read(self, result: str, values: list[str | None] | None) -> None:
        if self._metrics is None:
            return
        self._metrics.record_worker_store_read(result)
        if values is not None:
            found = sum(value is not None for value in values)
            self._metrics.record_detokenized(found, len(values) - found)

    async def rotate_epoch(self, principal: str, idempotency_key: str | None,
                           actor: commands.Actor | None = None) -> Outcome:
        return _outcome(await self._call("rotate_epoch", {
            "principal": principal, "idempotency_key": idempotency_key,
            "actor": (actor or commands.NO_ACTOR).fields()}))

    async def list_epochs(self, key_id: str | None = None) -> dict[str, Any]:
        return _document(await self._call("list_epochs", {"key_id": key_id}))

    async def create_key(self, name: str, scopes: list[str], actor: commands.Actor) -> Outcome:
        return _outcome(await self._call("create_key", {"name": name, "scopes": scopes, "actor": actor.fields()}))

    async def revoke_key(self, key_id: str, actor: commands.Actor) -> Outcome:
        return _outcome(await self._call("revoke_key", {"key_id": key_id, "actor": actor.fields()}))

    async def list_keys(self, key_id: str | None = None) -> dict[str, Any]:
        return _document(await self._call("list_keys", {"key_id": key_id}))

    async def audit_page(self, after: int, limit: int) -> dict[str, Any]:
        return _document(await self._call("audit_page", {"after": after, "limit": limit}))

    async def cluster_view(self) -> dict[str, Any]:
        return _document(await self._call("cluster_view", {}))

    async def delete_tokens(self, tokens: list[str], actor: commands.Actor | None = None,
                            epoch: int | None = None) -> Outcome:
        return _outcome(await self._call("delete_tokens", {"tokens": tokens, "epoch": epoch,
                                                           "actor": (actor or commands.NO_ACTOR).fields()}))

    async def retokenize(self, tokens: list[str], actor: commands.Actor | None = None,
                         epoch: int | None = None) -> dict[str, Any]:
        return _document(await self._call("retokenize", {"tokens": tokens, "epoch": epoch,
                                                         "actor": (actor or commands.NO_ACTOR).fields()}))

    async def epoch_tokens(self, epoch: int, after: str | None, limit: int,
                           key_id: str | None = None) -> dict[str, Any]:
        return _document(await self._call("epoch_tokens", {"epoch": epoch, "after": after, "limit": limit,
                                                           "key_id": key_id}))

    async def destroy_epoch(self, epoch: int, actor: commands.Actor | None = None) -> Outcome:
        return _outcome(await self._call("destroy_epoch", {"epoch": epoch,
                                                           "actor": (actor or commands.NO_ACTOR).fields()}))

    async def trim_audit(self, through_seq: int, through_hash: bytes,
                         actor: commands.Actor | None = None) -> Outcome:
        return _outcome(await self._call("trim_audit", {"through_seq": through_seq, "through_hash": through_hash,
                                                        "actor": (actor or commands.NO_ACTOR).fields()}))

    async def list_members(self, key_id: str | None = None) -> dict[str, Any]:
        return _document(await self._call("list_members", {"key_id": key_id}))

    async def change_member(self, action: str, node_id: str, peer_addr: str | None,
                            key_id: str | None = None) -> Outcome:
        return _outcome(await self._call("change_member", {"action": action, "node_id": node_id,
                                                           "peer_addr": peer_addr, "key_id": key_id}))

    async def open_backup(self) -> RemoteBackupStream:
        opened = _document(await self._call("backup.open", {}))
        if not all(type(opened.get(name)) is int for name in ("id", "index", "view", "total_bytes")):
            raise _unexpected()
        return RemoteBackupStream(self, opened["id"], opened["index"], opened["view"], opened["total_bytes"])

    async def metrics_text(self) -> str:
        text = await self._call("metrics", {})
        if not isinstance(text, str):
            raise _unexpected()
        return text

    async def close(self) -> None:
        return None


class RemoteBackupStream:
    """A backup the core streams, read a chunk per call (the HTTP layer's BackupStream interface)."""

    def __init__(self, service: RemoteService, stream_id: int, index: int, view: int, total_bytes: int) -> None:
        self._service = service
        self._id = stream_id
        self.index = index
        self.view = view
        self.total_bytes = total_bytes
        self.sent_bytes = 0
        self._closed = False

    async def chunks(self, chunk_bytes: int = BACKUP_CHUNK_BYTES) -> AsyncIterator[bytes]:
        offset = 0
        while offset < self.total_bytes:
            length = min(chunk_bytes, self.total_bytes - offset)
            data = await self._service._call("backup.read", {"id": self._id, "offset": offset, "length": length})
            if not isinstance(data, bytes) or len(data) != length:
                raise _unexpected()
            offset += length
            self.sent_bytes = offset
            yield data

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._service._call("backup.close", {"id": self._id})
        except Unavailable:
            pass  # the core is gone: it removed the checkpoint itself or will on its next start
