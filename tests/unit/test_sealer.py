"""tokenvault.core.sealer: the helper process that seals large tokenize batches.

Every test starts a real child process (``python -m tokenvault.core.sealer``). The
promises checked: the child's tokens and ciphertexts are exactly the node's own;
small or oversized batches stay in process; a child that dies, hangs or answers
wrongly is dropped for in-process sealing without a wrong answer; the child
goes when its parent goes; the child never holds the master key or the epoch
secrets (only each epoch's derived keys, over the socket pair), and neither
the master key nor a PKCS#11 PIN shows on its command line or in its
environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import msgpack
import pytest
from structlog.testing import capture_logs

from node_support import make_configs, start_node, wait_until
from tokenvault.crypto.keys import EpochKeys, KeyRing, MasterKey, new_epoch_secret
from tokenvault.core.sealer import MAX_BATCH_BYTES, Sealer, SealerUnavailable
from tokenvault.api.service import NodeService

VALUES = [f"4111-{number:012d}-é" for number in range(100)]


async def start_sealer(*, min_values: int = 16, max_pending_values: int = 10_000,
                       max_value_bytes: int = 4096, timeout_seconds: float = 5.0) -> Sealer:
    return await Sealer.start(min_values=min_values, max_pending_values=max_pending_values,
                              max_value_bytes=max_value_bytes, timeout_seconds=timeout_seconds)


class Started(NamedTuple):
    sealer: Sealer
    ring: KeyRing  # the parent's keys
    wrapped: dict[int, bytes]  # epoch -> its secret wrapped by master_key
    master_key: MasterKey


@contextlib.asynccontextmanager
async def running_sealer(epoch_count: int = 1, **options) -> AsyncIterator[Started]:
    """A started sealer and the parent's keys for ``epoch_count`` epochs; the sealer is closed on exit."""
    master_key = MasterKey.generate()
    ring, wrapped = epochs(master_key, epoch_count)
    sealer = await start_sealer(**options)
    try:
        yield Started(sealer, ring, wrapped, master_key)
    finally:
        await sealer.close()


def epochs(master_key: MasterKey, count: int) -> tuple[KeyRing, dict[int, bytes]]:
    wrapped = {epoch: master_key.wrap_epoch_secret(epoch, new_epoch_secret()) for epoch in range(1, count + 1)}
    return KeyRing.from_wrapped(master_key, wrapped.items()), wrapped


async def wait_process_gone(process: subprocess.Popen | int, timeout_seconds: float = 5.0) -> None:
    def gone() -> bool:
        if isinstance(process, subprocess.Popen):
            return process.poll() is not None
        try:
            os.kill(process, 0)
        except ProcessLookupError:
            return True
        return False
    await wait_until(gone, timeout_seconds, "the sealer process to exit")


async def test_the_sealer_process_seals_exactly_as_the_node_does_in_every_epoch() -> None:
    async with running_sealer(2) as (sealer, ring, wrapped, _):
        for epoch in (1, 2, 1):
            keys = ring.get(epoch)
            assert await sealer.seal(keys, VALUES) == tuple(keys.seal_many(VALUES))
        # Several batches in flight at once are answered each to its own request.
        batches = [[f"{epoch}-{number}-{value}" for value in VALUES[:40]] for epoch in (1, 2) for number in range(5)]
        answers = await asyncio.gather(*(sealer.seal(ring.get(1 + index // 5), batch)
                                         for index, batch in enumerate(batches)))
        for index, (batch, answer) in enumerate(zip(batches, answers)):
            assert answer == tuple(ring.get(1 + index // 5).seal_many(batch))
        assert sealer.batches == 13 and sealer.pending_values == 0 and sealer.alive
    await wait_process_gone(sealer._process)


async def test_small_oversized_and_queued_up_batches_stay_in_process() -> None:
    sealer = await start_sealer(min_values=32, max_pending_values=100, max_value_bytes=4096)
    try:
        assert not sealer.wants(31)
        assert sealer.wants(32) and sealer.wants(100)
        assert not sealer.wants(101)  # more than may wait in the child's queue
        sealer.pending_values = 60
        assert sealer.wants(40) and not sealer.wants(41)
        sealer.pending_values = 0
        big = await start_sealer(min_values=1, max_pending_values=10**7, max_value_bytes=1024)
        try:
            fits = MAX_BATCH_BYTES // 1024
            assert big.wants(fits) and not big.wants(fits + 1)  # the message bound, from the value limit
        finally:
            await big.close()
    finally:
        await sealer.close()
    assert not sealer.wants(32)  # closed


async def test_a_killed_sealer_is_dropped_and_the_node_seals_in_process_with_the_same_tokens(tmp_path: Path) -> None:
    (config,) = make_configs(tmp_path, 1)
    running = await start_node(config)
    sealer = await start_sealer()
    service = NodeService(running.node, sealer)
    try:
        await wait_until(lambda: running.node.store.active_epoch() == 1, 5.0, "epoch 1")
        first = await service.tokenize("tokenizer", VALUES, None)
        assert sealer.batches == 1
        inline = running.node.keyring.get(1).seal_many(VALUES)
        assert first.status == 200 and first.body.count(b"tv1_") == 100
        assert [token for token, _ in inline] == _tokens(first.body)
        assert sealed(running, "helper") == 100 and sealed(running, "node") == 0
        with capture_logs() as logs:
            os.kill(sealer.pid, signal.SIGKILL)
            await wait_until(lambda: not sealer.alive, 5.0, "the parent to notice the sealer is gone")
        assert [entry["event"] for entry in logs] == ["sealer.failed"]
        assert not any(value in repr(logs) for value in VALUES)
        again = await service.tokenize("tokenizer", VALUES + ["one more value"], None)
        assert _tokens(again.body)[:100] == _tokens(first.body)
        assert sealer.batches == 1 and not sealer.wants(100)
        assert sealed(running, "helper") == 100 and sealed(running, "node") == 101
    finally:
        await sealer.close()
        await service.close()
        await running.close()


def sealed(running, where: str) -> float:
    return running.node.metrics.registry.get_sample_value("tokenvault_sealed_values_total", {"where": where})


def _tokens(body: bytes) -> list[str]:
    return json.loads(body)["tokens"]


async def test_an_answer_that_differs_from_sealing_in_process_stops_the_sealer() -> None:
    async with running_sealer() as (sealer, ring, _, _):
        assert await sealer.seal(ring.get(1), VALUES) == tuple(ring.get(1).seal_many(VALUES))
        # The child holds epoch 1's keys; the parent now seals epoch 1 with other keys.
        other = EpochKeys(1, new_epoch_secret())
        with capture_logs() as logs:
            with pytest.raises(SealerUnavailable):
                await sealer.seal(other, VALUES)
        assert not sealer.alive and sealer.batches == 1
        assert [entry["event"] for entry in logs] == ["sealer.failed"]
        await wait_process_gone(sealer._process)


class _MalformedKeys:
    """Keys of epoch 1 whose derived keys have the wrong sizes: the child refuses to learn them."""

    epoch = 1

    def derived_keys(self) -> tuple[bytes, bytes]:
        return b"short", b"also short"


async def test_an_epoch_whose_keys_the_child_refuses_is_answered_cannot_and_the_sealer_stays() -> None:
    async with running_sealer(2) as (sealer, ring, _, _):
        with pytest.raises(SealerUnavailable):
            await sealer.seal(_MalformedKeys(), VALUES)  # type: ignore[arg-type]
        assert sealer.alive
        assert await sealer.seal(ring.get(2), VALUES) == tuple(ring.get(2).seal_many(VALUES))


async def test_the_child_learns_derived_keys_never_the_master_key_or_the_epoch_secret() -> None:
    """What crosses the socket pair: [ADD_EPOCH, epoch, token key, data key], nothing else secret."""
    master_key = MasterKey.generate()
    secret = new_epoch_secret()
    keys = KeyRing.from_wrapped(master_key, [(1, master_key.wrap_epoch_secret(1, secret))]).get(1)
    sealer = await start_sealer()
    sent: list[bytes] = []
    assert sealer._transport is not None
    write = sealer._transport.write
    sealer._transport.write = lambda data: (sent.append(bytes(data)), write(data))[1]  # type: ignore[method-assign]
    try:
        assert await sealer.seal(keys, VALUES) == tuple(keys.seal_many(VALUES))
    finally:
        await sealer.close()
    messages = list(msgpack.Unpacker(io.BytesIO(b"".join(sent)), raw=False))
    assert messages[0] == [0, 1, *keys.derived_keys()]
    everything = b"".join(sent)
    for secret_bytes in (secret, bytes.fromhex(master_key.to_hex())):
        assert secret_bytes not in everything and secret_bytes.hex().encode() not in everything


async def test_values_the_child_cannot_receive_are_left_to_the_in_process_seal() -> None:
    async with running_sealer() as (sealer, ring, wrapped, _):
        with pytest.raises(SealerUnavailable):
            await sealer.seal(ring.get(1), ["lone \ud800 surrogate"] * 40)
        # Nothing was sent, not even the epoch: the next batch still works.
        assert sealer.alive
        assert await sealer.seal(ring.get(1), VALUES) == tuple(ring.get(1).seal_many(VALUES))


async def test_a_hung_sealer_times_out_is_killed_and_not_used_again() -> None:
    async with running_sealer(timeout_seconds=0.3) as (sealer, ring, wrapped, _):
        os.kill(sealer.pid, signal.SIGSTOP)
        with pytest.raises(SealerUnavailable):
            # A deadline ten times the sealer's timeout: the seal gives up by itself (a TimeoutError here fails).
            await asyncio.wait_for(sealer.seal(ring.get(1), VALUES), 3.0)
        assert not sealer.alive and not sealer.wants(100)
        await wait_process_gone(sealer._process)


@pytest.mark.parametrize(("request_timeout_ms", "timeout_seconds"), [(5000, 2.0), (4000, 2.0), (3000, 1.5), (600, 0.3)])
async def test_a_node_waits_for_its_sealer_at_most_two_seconds_or_half_its_request_timeout(
        monkeypatch: pytest.MonkeyPatch, request_timeout_ms: int, timeout_seconds: float) -> None:
    """docs/failure-modes.md, "Sealer helper killed, hung or answering wrongly": a hung helper delays the
    batches waiting on it by at most min(2 s, request timeout / 2), the timeout the node starts it with."""
    from types import SimpleNamespace

    from tokenvault import serve
    from tokenvault.config import LimitsConfig, SealerConfig, TimingConfig

    asked: list[float] = []

    async def start(**arguments: object) -> None:
        asked.append(arguments["timeout_seconds"])  # type: ignore[arg-type]

    monkeypatch.setattr(Sealer, "start", start)
    config = SimpleNamespace(sealer=SealerConfig(), limits=LimitsConfig(),
                             timing=TimingConfig(request_timeout_ms=request_timeout_ms))
    await serve._start_sealer(SimpleNamespace(config=config))  # type: ignore[arg-type]
    assert asked == [timeout_seconds]


async def test_the_sealer_exits_when_its_node_is_killed(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from tokenvault.core.sealer import Sealer\n"
        "async def main():\n"
        "    sealer = await Sealer.start(min_values=1, max_pending_values=10,\n"
        "                                max_value_bytes=10, timeout_seconds=1)\n"
        "    print('pid', sealer.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert parent.stdout is not None
        lines = iter(parent.stdout.readline, b"")
        child_pid = next(int(line.split()[1]) for line in lines if line.startswith(b"pid "))
        os.kill(child_pid, 0)  # running
        parent.kill()
        parent.wait()
        await wait_process_gone(child_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


async def test_no_secret_is_on_the_sealers_command_line_or_in_its_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Variables a parent could still hold: the child gets no TOKENVAULT_* variable at all.
    master_key = MasterKey.generate()
    monkeypatch.setenv("TOKENVAULT_MASTER_KEY", master_key.to_hex())
    monkeypatch.setenv("TOKENVAULT_PKCS11_PIN", "pin-4711-not-for-children")
    sealer = await start_sealer()
    try:
        # /proc reads empty while the child is still between fork and exec: wait until it has its own,
        # so the checks below never pass on an empty read.
        deadline = time.monotonic() + 5
        while b"PATH=" not in Path(f"/proc/{sealer.pid}/environ").read_bytes():  # the rest is inherited
            assert time.monotonic() < deadline, "the sealer's environment never showed"
            await asyncio.sleep(0.01)
        for name in ("cmdline", "environ"):
            seen = Path(f"/proc/{sealer.pid}/{name}").read_bytes()
            assert seen and master_key.to_hex().encode() not in seen and b"pin-4711" not in seen
            assert b"TOKENVAULT_" not in seen
    finally:
        await sealer.close()


def test_the_child_stops_on_a_malformed_message_without_echoing_what_it_received() -> None:
    parent_end, child_end = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-m", "tokenvault.core.sealer", str(child_end.fileno())],
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(child_end.fileno(),),
                             cwd=Path(__file__).resolve().parents[2])
    child_end.close()
    try:
        assert child.stderr is not None
        parent_end.sendall(msgpack.packb([7, "SECRET-VALUE-4111"]))
        assert child.wait(timeout=10) == 1
        error = child.stderr.read().decode()
        assert "stopping after ValueError" in error and "SECRET-VALUE" not in error
    finally:
        parent_end.close()
        if child.poll() is None:
            child.kill()
            child.wait()


def test_the_child_forgets_a_destroyed_epoch() -> None:
    from tokenvault.core.sealer import ADD_EPOCH, FORGET_EPOCH, SEAL, _answer
    ring: dict[int, EpochKeys] = {}
    keys = EpochKeys(1, new_epoch_secret())
    _answer(ring, [ADD_EPOCH, 1, *keys.derived_keys()])
    assert msgpack.unpackb(_answer(ring, [SEAL, 7, 1, ["v"]]))[1] is not None
    assert _answer(ring, [FORGET_EPOCH, 1]) is None
    assert ring == {}
    assert msgpack.unpackb(_answer(ring, [SEAL, 8, 1, ["v"]])) == [8, None, None]


async def test_forget_reaches_the_child_and_a_later_seal_teaches_the_epoch_again() -> None:
    async with running_sealer(epoch_count=2, min_values=1) as started:
        sealer, ring = started.sealer, started.ring
        values = [f"v{number}" for number in range(4)]
        assert await sealer.seal(ring.get(1), values) == tuple(ring.get(1).seal_many(values))
        sealer.forget(1)
        sealer.forget(2)  # never learnt: nothing is sent
        assert sealer.alive
        # Only a parent that has forgotten too re-teaches the epoch, so this still seals correctly.
        assert await sealer.seal(ring.get(1), values) == tuple(ring.get(1).seal_many(values))
