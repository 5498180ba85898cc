"""tokenvault.logs: JSON lines with ts/level/node/event, redaction of sensitive fields."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenvault.logs import (
    SENSITIVE_FIELD_NAMES,
    configure_logging,
    drop_sensitive_fields,
    get_logger,
    is_sensitive_field,
    log_loop_exceptions,
    parse_level,
    reset_logging,
)

SECRET = "plaintext-4111-1111-1111-1111"


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "logs" / "node.log"
    configure_logging("n7", path, "info")
    yield path
    reset_logging()


def read_lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_each_event_is_one_json_line_with_the_required_fields_first(log_file: Path) -> None:
    logger = get_logger("test")
    logger.info("token.issued", count=3, epoch=2)
    logger.warning("peer.down", peer="n2")
    first, second = read_lines(log_file)
    assert list(first)[:4] == ["ts", "level", "node", "event"]
    assert first["level"] == "info" and first["node"] == "n7" and first["event"] == "token.issued"
    assert first["count"] == 3 and first["epoch"] == 2 and first["logger"] == "test"
    assert second["level"] == "warning" and second["peer"] == "n2"


def test_timestamp_is_rfc3339_utc(log_file: Path) -> None:
    before = datetime.now().astimezone()
    get_logger().info("node.started")
    (line,) = read_lines(log_file)
    assert line["ts"].endswith("Z")
    stamp = datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)
    assert abs(stamp - before) < timedelta(seconds=30)


def test_level_filters_lower_events(log_file: Path) -> None:
    logger = get_logger()
    logger.debug("too.detailed")
    logger.info("kept")
    assert [line["event"] for line in read_lines(log_file)] == ["kept"]


def test_sensitive_fields_are_dropped_and_named(log_file: Path) -> None:
    logger = get_logger()
    logger.info(
        "oops", value=SECRET, values=[SECRET], plaintext=SECRET, secret=SECRET, key=SECRET, api_key=SECRET,
        master_key=SECRET, epoch_secret=SECRET, nested={"api_key": SECRET, "count": 1}, count=1,
    )
    text = log_file.read_text()
    assert SECRET not in text
    (line,) = read_lines(log_file)
    assert line["count"] == 1 and line["nested"] == {"count": 1}
    assert line["redacted"] == sorted(
        ["value", "values", "plaintext", "secret", "key", "api_key", "master_key", "epoch_secret", "nested.api_key"]
    )


def test_bound_sensitive_fields_are_dropped_too(log_file: Path) -> None:
    get_logger("bound", api_key=SECRET).info("request")
    assert SECRET not in log_file.read_text()


def test_caller_dicts_are_not_mutated(log_file: Path) -> None:
    nested = {"secret": SECRET, "size": 2}
    get_logger().info("event", details=nested)
    assert nested == {"secret": SECRET, "size": 2}
    assert read_lines(log_file)[0]["details"] == {"size": 2}


def test_exceptions_are_logged_by_type_and_frames_without_message(log_file: Path) -> None:
    try:
        raise ValueError(f"could not handle {SECRET}")
    except ValueError:
        get_logger().exception("request.failed")
    text = log_file.read_text()
    assert SECRET not in text
    (line,) = read_lines(log_file)
    assert line["exception_type"] == "builtins.ValueError"
    assert "test_exceptions_are_logged_by_type_and_frames_without_message" in line["traceback"]
    assert line["level"] == "error"


def test_standard_library_records_are_bridged(log_file: Path) -> None:
    logging.getLogger("aiohttp.server").warning("Error handling request from %s", "127.0.0.1")
    logging.getLogger("aiohttp.access").info("this stays out of the node log")
    try:
        raise RuntimeError(SECRET)
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    lines = read_lines(log_file)
    assert [line["event"] for line in lines] == ["Error handling request from 127.0.0.1", "Error handling request"]
    assert all(line["node"] == "n7" and line["logger"] == "aiohttp.server" for line in lines)
    assert lines[1]["exception_type"] == "builtins.RuntimeError"
    assert SECRET not in log_file.read_text()


def test_what_asyncio_reports_itself_is_logged_without_the_message_or_the_objects_involved(log_file: Path) -> None:
    """asyncio's own report of a task's exception nobody awaited quotes the exception and the task,
    and of a failing callback the callback's arguments: through the bridge both reached the log
    (checked on the code before). With log_loop_exceptions only the type, the frames and the kinds
    of object involved do."""
    async def fails(value: str) -> None:
        raise ValueError(f"could not handle {value}")

    def callback(value: str) -> None:
        raise KeyError(value)

    async def main() -> None:
        log_loop_exceptions(asyncio.get_running_loop())
        task = asyncio.get_running_loop().create_task(fails(SECRET))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert task.done()
        del task
        gc.collect()  # the never-retrieved exception is reported when the task is freed
        asyncio.get_running_loop().call_soon(callback, SECRET)
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert SECRET not in log_file.read_text()
    lines = [line for line in read_lines(log_file) if line["event"] == "loop.exception"]
    assert [(line["level"], line["exception_type"]) for line in lines] == [
        ("error", "builtins.ValueError"), ("error", "builtins.KeyError")]
    assert "future" in lines[0]["involved"] and "handle" in lines[1]["involved"]
    assert "in fails" in lines[0]["traceback"] and "in callback" in lines[1]["traceback"]


def test_reconfiguring_replaces_the_bridge_and_file(tmp_path: Path) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    try:
        configure_logging("a", first, "info")
        configure_logging("b", second, "info")
        logging.getLogger("x").warning("once")
        get_logger().info("after")
    finally:
        reset_logging()
    assert first.read_text() == ""
    assert [line["event"] for line in read_lines(second)] == ["once", "after"]


def test_stderr_when_no_file(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        configure_logging("n1", None, "warning")
        get_logger().info("hidden")
        get_logger().error("shown", count=1)
    finally:
        reset_logging()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["event"], line["node"]) for line in lines] == [("shown", "n1")]


def test_parse_level() -> None:
    assert parse_level("INFO") == logging.INFO
    assert parse_level(" debug ") == logging.DEBUG
    assert parse_level(logging.ERROR) == logging.ERROR
    with pytest.raises(ValueError):
        parse_level("verbose")


field_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20)


@given(
    fields=st.dictionaries(
        field_names | st.sampled_from(sorted(SENSITIVE_FIELD_NAMES)) | field_names.map(lambda name: name + "_secret"),
        st.just(SECRET) | st.dictionaries(st.sampled_from(["api_key", "value", "size"]), st.just(SECRET)),
        max_size=8,
    )
)
def test_drop_sensitive_fields_property(fields: dict) -> None:
    event = {"event": "x", **fields}
    result = drop_sensitive_fields(None, "info", dict(event))
    for name, content in result.items():
        assert not (name != "event" and is_sensitive_field(name))
        if isinstance(content, dict):
            assert not any(is_sensitive_field(inner) for inner in content)
    dropped = {name for name in fields if is_sensitive_field(name)}
    assert dropped <= set(result.get("redacted", []))


async def test_a_summed_event_logs_at_once_then_at_most_once_an_interval_per_key_with_the_counts_summed(
        log_file: Path) -> None:
    import asyncio

    from tokenvault.logs import SummedEvent

    issued = SummedEvent(get_logger("node"), "token.issued", ("epoch",), interval_seconds=0.2)
    issued.add(3, 1)  # after a quiet interval: a line at once
    assert [(line["count"], line["epoch"]) for line in read_lines(log_file)] == [(3, 1)]
    for _ in range(100):
        issued.add(2, 1)
    issued.add(5, 2)
    assert len(read_lines(log_file)) == 1  # the rest waits for the interval's end
    await asyncio.sleep(0.35)
    lines = read_lines(log_file)
    assert [(line["event"], line["count"], line["epoch"]) for line in lines[1:]] == [
        ("token.issued", 200, 1), ("token.issued", 5, 2)]
    assert all(line["level"] == "info" and line["node"] == "n7" for line in lines)
    await asyncio.sleep(0.25)
    issued.add(7, 2)  # the interval since the last line is over: at once again
    assert [(line["count"], line["epoch"]) for line in read_lines(log_file)[3:]] == [(7, 2)]
    issued.add(1, 2)
    issued.flush()  # a node that stops logs what waits, and no timer is left behind
    assert [(line["count"], line["epoch"]) for line in read_lines(log_file)[4:]] == [(1, 2)]
    await asyncio.sleep(0.3)
    assert len(read_lines(log_file)) == 5
    with pytest.raises(ValueError):
        SummedEvent(get_logger(), "x", ("epoch",), interval_seconds=0)
    with pytest.raises(ValueError):
        issued.add(1, 2, "one field too many")


async def test_a_summed_event_keeps_a_bounded_number_of_keys_however_many_hosts_a_flood_comes_from(
        log_file: Path) -> None:
    from tokenvault.logs import SummedEvent

    failed = SummedEvent(get_logger("transport"), "peer.handshake_failed", ("remote", "reason"),
                         interval_seconds=60, level="warning", max_keys=4)
    for host in range(1000):
        failed.add(1, f"10.0.{host // 256}.{host % 256}", "HandshakeError")
    assert len(failed._waiting) <= 5  # four hosts and the others, not a thousand
    failed.flush()
    lines = read_lines(log_file)
    # The first host at once (a quiet interval before it), then four hosts and the others.
    assert len(lines) == 6 and sum(line["count"] for line in lines) == 1000
    assert [line["remote"] for line in lines].count(SummedEvent.OTHER_KEYS) == 1
    with pytest.raises(ValueError):
        SummedEvent(get_logger(), "x", ("remote",), max_keys=0)
