"""Structured JSON-lines logging for a node (structlog).

One JSON object per line with ``ts`` (RFC 3339, UTC), ``level``, ``node`` and
``event`` first, then the event's fields. Logging goes through structlog only;
records from the standard library (aiohttp, asyncio) are bridged into the same
format so the node log stays one machine-readable stream.

Defence in depth: the code never passes a value, key or API key to a logger,
but ``drop_sensitive_fields`` removes any field whose name says it could hold
one, and ``exception_without_message`` logs exceptions by type and traceback
frames only, because an exception message could quote its input.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import sys
import traceback
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog._config import BoundLoggerLazyProxy

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Field names that could carry a plaintext value or key material. A field is
# dropped when its lower-cased name is one of these or ends with one of the
# suffixes; the record keeps a ``redacted`` list naming what was dropped.
SENSITIVE_FIELD_NAMES = frozenset(
    {
        "value",
        "values",
        "plaintext",
        "plaintexts",
        "secret",
        "secrets",
        "key",
        "keys",
        "api_key",
        "master_key",
        "authorization",
        "password",
        "ciphertext",
    }
)
SENSITIVE_FIELD_SUFFIXES = ("_secret", "_api_key", "_plaintext", "_master_key", "_password")
FIRST_FIELDS = ("ts", "level", "node", "event")

_open_log_file: TextIO | None = None


def is_sensitive_field(name: str) -> bool:
    """True when a log field called ``name`` must never be written."""
    lowered = name.lower()
    return lowered in SENSITIVE_FIELD_NAMES or lowered.endswith(SENSITIVE_FIELD_SUFFIXES)


def drop_sensitive_fields(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Remove sensitive fields, including those nested inside dict fields."""
    redacted: list[str] = []
    _scrub_mapping(event_dict, "", redacted)
    if redacted:
        event_dict["redacted"] = sorted(redacted)
    return event_dict


def _scrub_mapping(mapping: MutableMapping[str, Any], prefix: str, redacted: list[str]) -> None:
    for name in list(mapping.keys()):
        if not isinstance(name, str):
            continue
        if name != "event" and is_sensitive_field(name):
            del mapping[name]
            redacted.append(prefix + name)
            continue
        nested = mapping[name]
        if isinstance(nested, dict):
            # Copy before scrubbing so a caller's dict is never mutated by logging.
            copy = dict(nested)
            _scrub_mapping(copy, f"{prefix}{name}.", redacted)
            mapping[name] = copy


def exception_without_message(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace ``exc_info`` by the exception's type and stack frames, without its message."""
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    exception_type, _exception, trace = exc_info
    if exception_type is None:
        return event_dict
    event_dict["exception_type"] = f"{exception_type.__module__}.{exception_type.__qualname__}"
    event_dict["traceback"] = "".join(traceback.format_tb(trace)) if trace is not None else ""
    return event_dict


def _add_node(node_id: str, process: str | None) -> structlog.types.Processor:
    def add_node(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict.setdefault("node", node_id)
        if process is not None:
            event_dict.setdefault("process", process)
        return event_dict

    return add_node


def _first_fields_in_order(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Put ts, level, node and event first so a human can scan the file."""
    ordered: dict[str, Any] = {name: event_dict.pop(name) for name in FIRST_FIELDS if name in event_dict}
    ordered.update(event_dict)
    return ordered


def _processors(node_id: str, process: str | None = None) -> list[structlog.types.Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        _add_node(node_id, process),
        exception_without_message,
        drop_sensitive_fields,
        _first_fields_in_order,
    ]


def parse_level(level: str | int) -> int:
    """Accept ``"info"``-style names or logging's integer levels."""
    if isinstance(level, int):
        return level
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}") from None


def enable_crash_stacks() -> None:
    """A crash in a C extension (RocksDB, say) prints the Python stack of every thread (file, line and
    function names, never a value) to stderr, a node's captured output, instead of ending the process
    without a word. Nothing happens where stderr has no file behind it (a test's runner)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        faulthandler.enable()


def configure_logging(node_id: str, log_file: Path | None, level: str | int = "info", *,
                      process: str | None = None) -> None:
    """Send every log record of this process to ``log_file`` (stderr when None) as JSON lines.

    ``process`` names the process in every line (``worker-1``) where a node is several processes
    writing one file (each line is one append)."""
    global _open_log_file
    numeric_level = parse_level(level)
    stream: TextIO
    if log_file is None:
        stream = sys.stderr
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives as long as the process
    previous, _open_log_file = _open_log_file, (stream if log_file is not None else None)
    processors = _processors(node_id, process)
    structlog.configure(
        processors=[*processors, structlog.processors.JSONRenderer(ensure_ascii=False, default=str)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _bridge_standard_logging(stream, processors, numeric_level)
    if previous is not None and previous is not stream:
        previous.close()


def _bridge_standard_logging(stream: TextIO, processors: list[structlog.types.Processor], level: int) -> None:
    """Route the standard library's records (aiohttp, asyncio) into the same JSON lines."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(ensure_ascii=False, default=str),
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_tokenvault_handler", False):
            root.removeHandler(existing)
    handler._tokenvault_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    # Library chatter below WARNING (aiohttp access lines, asyncio debug) stays out of the node log.
    root.setLevel(max(level, logging.WARNING))


def log_loop_exceptions(loop: asyncio.AbstractEventLoop) -> None:
    """Report the exceptions asyncio reports itself (a task's nobody awaited, a callback's, a
    transport's) as ``loop.exception``: the exception's type and frames and the kinds of object
    involved. asyncio's own report (its default handler, through the bridge above) quotes the
    exception's message and the repr of the task, the callback with its arguments or the transport,
    any of which can hold a value."""
    loop.set_exception_handler(_log_loop_exception)


def _log_loop_exception(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exception = context.get("exception")
    _loop_log.error("loop.exception", involved=sorted(name for name in context if name not in ("message", "exception")),
                    exc_info=exception if isinstance(exception, BaseException) else None)


def get_logger(name: str | None = None, **fields: Any) -> Any:
    """A structlog logger bound to ``logger=name`` (when given) and ``fields``."""
    # Initial values keep the proxy lazy: module-level loggers created at import
    # time must pick up the configuration made later by configure_logging().
    if name is not None:
        fields = {"logger": name, **fields}
    return BoundLoggerLazyProxy(None, initial_values=fields)


_loop_log = get_logger("loop")


class SummedEvent:
    """An event that can happen thousands of times a second (``token.issued``, a malformed request),
    logged at most once per ``interval_seconds`` for each combination of its ``keys`` fields, with
    ``count`` summed since its last line: a log that grows with the time a node runs, not with its
    traffic or with what a hostile client sends.

    The first count after a quiet interval is logged at once; counts within the interval after a
    line wait for a timer on the running loop that logs their sum when the interval ends. ``flush``
    logs what is waiting (a node that stops). At most ``max_keys`` combinations wait at once: the
    counts of any further ones (a flood from many remote hosts) are summed under ``OTHER_KEYS`` in
    every field, so the memory and the lines of an interval stay bounded whatever a peer sends."""

    OTHER_KEYS = "(others)"

    def __init__(self, logger: Any, event: str, keys: tuple[str, ...], interval_seconds: float = 1.0, *,
                 level: str = "info", max_keys: int = 32) -> None:
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r}")
        self._logger = logger
        self._level = level
        self._event = event
        self._keys = keys
        self._interval = interval_seconds
        self._max_keys = max_keys
        self._others = (self.OTHER_KEYS,) * len(keys)
        self._waiting: dict[tuple[Any, ...], int] = {}
        self._logged_at = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def add(self, count: int, *key_values: Any) -> None:
        if len(key_values) != len(self._keys):
            raise ValueError(f"{self._event} is summed by {self._keys}")
        if key_values not in self._waiting and len(self._waiting) >= self._max_keys:
            key_values = self._others
        self._waiting[key_values] = self._waiting.get(key_values, 0) + count
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            if self._timer_loop is loop:
                return
            self.flush()  # a timer of a loop that is gone (a test's) would never fire: log now
            return
        wait = self._logged_at + self._interval - loop.time()
        if wait <= 0:
            self.flush()
        else:
            self._timer, self._timer_loop = loop.call_later(wait, self.flush), loop

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_loop = None, None
        if not self._waiting:
            return
        try:
            self._logged_at = asyncio.get_running_loop().time()
        except RuntimeError:
            self._logged_at = float("-inf")  # no loop: a node closing outside one
        waiting, self._waiting = self._waiting, {}
        for key_values, count in sorted(waiting.items(), key=lambda item: repr(item[0])):
            getattr(self._logger, self._level)(self._event, count=count, **dict(zip(self._keys, key_values)))


def reset_logging() -> None:
    """Undo configure_logging: structlog defaults, no bridged handler, log file closed (for tests)."""
    global _open_log_file
    structlog.reset_defaults()
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_tokenvault_handler", False):
            root.removeHandler(existing)
    if _open_log_file is not None:
        _open_log_file.close()
        _open_log_file = None
