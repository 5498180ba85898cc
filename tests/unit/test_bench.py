"""The load generator: its minimal HTTP/1.1 client (parsing, a real round trip), its CPU accounting and
its load processes (--client-processes)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from httpclients import MAX_HEADER_BYTES, open_client, parse_response  # noqa: E402


def test_a_response_with_content_length_is_parsed_only_once_complete() -> None:
    whole = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhelloNEXT"
    assert parse_response(whole[:20]) is None
    assert parse_response(whole[:-6]) is None
    status, body, consumed, keep_alive = parse_response(whole)
    assert (status, body, keep_alive) == (200, b"hello", True)
    assert whole[consumed:] == b"NEXT"


def test_a_chunked_response_is_reassembled() -> None:
    whole = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    assert parse_response(whole[:-2]) is None
    status, body, consumed, _ = parse_response(whole)
    assert (status, body, consumed) == (201, b"abcde", len(whole))


def test_connection_close_and_http_1_0_end_keep_alive() -> None:
    assert parse_response(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")[3] is False
    assert parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")[3] is False
    assert parse_response(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")[3] is True


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"SMTP 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nbody without a length",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
    b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * MAX_HEADER_BYTES,
])
def test_malformed_or_oversized_responses_are_refused(response: bytes) -> None:
    with pytest.raises(ValueError):
        parse_response(response)


async def test_both_clients_post_to_a_real_server_and_reuse_connections() -> None:
    peers: set[object] = set()

    async def echo(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername"))
        body = await request.read()
        return web.Response(status=201, body=body[::-1], headers={"X-Auth": request.headers["Authorization"]})

    app = web.Application()
    app.router.add_post("/echo", echo)
    async with local_server(app) as base_url:
        for kind in ("raw", "aiohttp"):
            peers.clear()
            async with open_client(kind, 1) as client:
                for number in range(3):
                    status, body = await client.post(0, f"{base_url}/echo", b"abc%d" % number,
                                                      {"Authorization": "Bearer k"})
                    assert (status, body) == (201, b"%dcba" % number)
            assert len(peers) == 1, kind  # one keep-alive connection carried all three


@asynccontextmanager
async def local_server(app: web.Application) -> AsyncIterator[str]:
    """``app`` served on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


async def test_the_raw_client_refuses_anything_but_plain_http() -> None:
    async with open_client("raw", 1) as client:
        with pytest.raises(ValueError):
            await client.post(0, "https://127.0.0.1:1/x", b"", {})
    with pytest.raises(ValueError):
        async with open_client("curl", 1):
            pass


def test_the_cpu_accounting_reads_proc_and_reports_per_acknowledged_request(tmp_path: Path) -> None:
    import os

    import loadgen

    before = loadgen.process_cpu_seconds([os.getpid()])
    deadline = loadgen.own_cpu_seconds() + 0.05
    while loadgen.own_cpu_seconds() < deadline:
        pass
    assert loadgen.process_cpu_seconds([os.getpid()]) > before
    assert loadgen.process_cpu_seconds([os.getpid(), 2 ** 22 + 12345]) is None  # no such process
    (tmp_path / "good.pid").write_text(f"{os.getpid()}\n")
    (tmp_path / "bad.pid").write_text("not a pid")
    assert loadgen.read_pids([tmp_path / "good.pid", tmp_path / "bad.pid", tmp_path / "missing.pid", None]) == [
        os.getpid()]
    measurement = loadgen.Measurement(requests=10, values=10, latencies_ms=[1.0] * 10, window_seconds=1.0,
                                      completed_ok=20, server_cpu_seconds=0.01, client_cpu_seconds=0.002)
    assert "servers 500 us, load generator 100 us" in loadgen.report_line("x", measurement)
    measurement.server_cpu_seconds = None
    assert "CPU per" not in loadgen.report_line("x", measurement)


def test_the_busiest_process_is_the_one_that_used_the_most_cpu_over_the_elapsed_time() -> None:
    import os
    import subprocess
    import sys

    import loadgen

    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pids = [idle.pid, os.getpid()]
        before = loadgen.server_cpu(pids)
        deadline = loadgen.own_cpu_seconds() + 0.2
        while loadgen.own_cpu_seconds() < deadline:  # this process spins; the child sleeps
            pass
        measurement = loadgen.Measurement(requests=1, values=1, latencies_ms=[1.0], window_seconds=1.0,
                                          completed_ok=1)
        loadgen.record_server_cpu(measurement, pids, before)
    finally:
        idle.kill()
        idle.wait()
    assert measurement.busiest_process is not None
    kind, pid, seconds, elapsed = measurement.busiest_process
    assert (kind, pid) == ("other", os.getpid())
    assert 0.15 <= seconds <= elapsed + 0.05
    assert measurement.server_cpu_seconds is not None and measurement.server_cpu_seconds >= seconds
    line = loadgen.report_line("x", measurement)
    assert f"busiest process: other (pid {os.getpid()}) at" in line and "CPUs over warm-up and window" in line
    unreadable = loadgen.Measurement()
    loadgen.record_server_cpu(unreadable, [2 ** 22 + 12345], loadgen.server_cpu([2 ** 22 + 12345]))
    assert unreadable.busiest_process is None and unreadable.server_cpu_seconds is None


@asynccontextmanager
async def recording_vault() -> AsyncIterator[tuple[str, dict[str, list[float]], list[str]]]:
    """A stand-in vault whose tokenize answers under any path prefix; yields its base URL, the arrival
    times (time.monotonic) of the requests per prefix, and every value it was sent."""
    arrivals: dict[str, list[float]] = {}
    values: list[str] = []

    async def tokenize(request: web.Request) -> web.Response:
        arrivals.setdefault(request.match_info["prefix"], []).append(time.monotonic())
        sent = (await request.json())["values"]
        values.extend(sent)
        return web.json_response({"tokens": [f"token-{value}" for value in sent]})

    app = web.Application()
    app.router.add_post("/{prefix}/v1/tokenize", tokenize)
    async with local_server(app) as base_url:
        yield base_url, arrivals, values


async def test_two_load_processes_measure_one_window_with_their_own_values_and_workers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import loadgen
    # Time enough for both children to start on a loaded machine, so that the common instant is common.
    monkeypatch.setattr(loadgen, "CHILD_STARTUP_SECONDS", 6.0)

    async with recording_vault() as (base, arrivals, values):
        # Four URLs for four workers: worker n sends to prefix n (worker % len(urls)), so every prefix
        # being hit shows that both processes ran and that their worker numbers did not overlap.
        urls = tuple(f"{base}/w{number}" for number in range(4))
        workload = loadgen.Workload("vault", "tokenize", urls, batch=3, api_key="k", seed=11)
        measurement = await loadgen.drive(workload, 4, 0.5, 0.2, "raw", processes=2)
    assert measurement.errors == Counter()
    assert sorted(arrivals) == ["w0", "w1", "w2", "w3"]
    assert 0 < measurement.requests == len(measurement.latencies_ms) < sum(map(len, arrivals.values()))
    assert measurement.values == 3 * measurement.requests
    # Every request the server answered was acknowledged to one of the processes, warm-up included.
    assert measurement.completed_ok == sum(map(len, arrivals.values()))
    assert len(set(values)) == len(values)  # each process drew its fresh values from a seed of its own
    assert measurement.window_seconds == 0.5 and measurement.client_cpu_seconds > 0
    # Both processes started on the common instant rather than when each happened to be ready.
    first_arrivals = [times[0] for times in arrivals.values()]
    assert max(first_arrivals) - min(first_arrivals) < 0.25


async def test_a_failing_load_process_fails_the_run_with_its_error_at_once() -> None:
    import loadgen

    # The CA file is only read when a process opens its client, so each load process fails there.
    workload = loadgen.Workload("vault", "tokenize", ("https://127.0.0.1:1",), api_key="k",
                                ca_file="/nonexistent/cluster-ca.pem")
    started = time.monotonic()
    with pytest.raises(loadgen.LoadProcessError, match=r"load process \d exited") as failure:
        await loadgen.drive(workload, 2, 60.0, 0.2, "raw", processes=2)
    assert "cluster-ca.pem" in str(failure.value)  # the child's stderr
    assert time.monotonic() - started < 15  # long before the 60-second window would have ended


def test_the_workers_are_split_evenly_and_only_a_workload_crosses_into_processes() -> None:
    import asyncio

    import loadgen

    assert loadgen.worker_ranges(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert loadgen.worker_ranges(2, 2) == [range(0, 1), range(1, 2)]
    workload = loadgen.Workload("etcd", "insert-if-absent", ("http://127.0.0.1:1",), seed=5)
    assert loadgen.Workload.from_json(workload.to_json()) == workload
    assert len({workload.for_process(index).seed for index in range(3)} | {workload.seed}) == 4
    assert loadgen.Workload("vault", "tokenize", ("http://x",)).for_process(1).seed is None  # fresh randomness
    with pytest.raises(ValueError, match="unknown workload"):
        loadgen.Workload("vault", "insert-if-absent", ("http://x",))
    with pytest.raises(TypeError, match="only a Workload"):
        asyncio.run(loadgen.drive(loadgen.build_operation(workload), 2, 0.1, 0.0, processes=2))
    with pytest.raises(ValueError, match="cannot share"):
        asyncio.run(loadgen.drive(workload, 2, 0.1, 0.0, processes=3))


async def test_a_plain_operation_is_still_driven_in_this_process() -> None:
    import loadgen

    async with recording_vault() as (base, arrivals, values):
        target = loadgen.VaultTarget([f"{base}/w0"], "k", seed=3)
        measurement = await loadgen.drive(target.tokenize(2), 2, 0.3, 0.1, "raw")
    assert measurement.errors == Counter() and 0 < measurement.requests < len(arrivals["w0"])
    assert measurement.completed_ok == len(arrivals["w0"]) and measurement.values == 2 * measurement.requests


def test_the_http_floor_bench_runs_each_server_and_prints_its_cost(capsys: pytest.CaptureFixture[str]) -> None:
    import http_floor

    affinity = os.sched_getaffinity(0)
    kinds = ("aiohttp-app", "aiohttp-lowlevel", "tokenvault", "httptools")
    for kind in kinds:
        http_floor.measure(kind, concurrency=2, duration=0.3)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(kinds)
    assert all("us per request" in line and int(line.split()[1].replace(",", "")) > 0 for line in lines)
    assert os.sched_getaffinity(0) == affinity  # the client's pinning ends with the run


@pytest.mark.skipif(not (shutil.which("etcd") or Path("/usr/bin/etcd").exists()), reason="etcd is not installed")
async def test_etcd_with_tls_serves_only_over_tls_and_its_transactions_run_through_the_load_generator(
        tmp_path: Path) -> None:
    import loadgen

    processes, urls, ca_file = loadgen.start_etcd(tmp_path, members=1, tls=True)
    try:
        assert ca_file is not None and all(url.startswith("https://") for url in urls)
        workload = loadgen.Workload("etcd", "insert-if-absent", tuple(urls), ca_file=str(ca_file), seed=1)
        measurement = await loadgen.drive(workload, 2, 0.3, 0.1, "raw")
        assert measurement.errors == Counter() and measurement.completed_ok > 0
        # Plain HTTP on the same port is not served: the comparison pays for TLS on both sides.
        plain = loadgen.Workload("etcd", "insert-if-absent", tuple(url.replace("https://", "http://") for url in urls),
                                 seed=2)
        refused = await loadgen.drive(plain, 1, 0.3, 0.0, "raw")
        assert refused.completed_ok == 0 and sum(refused.errors.values()) > 0
    finally:
        loadgen.stop_processes(processes)


@pytest.mark.parametrize("families, buffers, mib", [(1, "split", 64), (4, "split", 64), (3, "each", 8), (1, "split", 16)])
def test_the_lsm_split_bench_prints_every_window_and_the_whole_fill(
        families: int, buffers: str, mib: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import lsm_split

    lsm_split.main(["--tokens", "25000", "--window", "10000", "--families", str(families), "--buffers", buffers,
                    "--write-buffer-mib", str(mib), "--directory", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"write buffer {mib} MiB {'in all' if buffers == 'split' else 'each'}")
    windows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[0] for row in windows] == ["10,000", "20,000", "25,000"]
    assert all(float(row[1].replace(",", "")) > 0 for row in windows)  # values/s
    # The CPU figures, printed with one decimal; at this size the process's (10 ms clock ticks) may be 0.0.
    assert all(len(row) == 5 and all(re.fullmatch(r"-?\d+\.\d", field) for field in row[2:4]) for row in windows)
    assert lines[-1].startswith("filled at ") and "bytes per value on disk" in lines[-1]
    assert list(tmp_path.iterdir()) == []  # the database is gone


def test_the_lsm_split_bench_counts_what_rocksdb_wrote_once_it_is_over_its_resolution(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """150,000 tokens through a 1 MiB write buffer flush about 13 MB: over the 10 MB that RocksDB's
    statistics resolve, so the bytes written per value are counted, and about the bytes stored."""
    import lsm_split

    lsm_split.main(["--tokens", "150000", "--window", "150000", "--write-buffer-mib", "1",
                    "--directory", str(tmp_path)])
    summary = capsys.readouterr().out.splitlines()[-1]
    written = int(summary.split("flushes and compactions wrote ")[1].split()[0])
    assert 30 <= written <= 1000, summary


def test_the_lsm_split_bench_puts_each_token_in_the_family_of_its_first_character(tmp_path: Path) -> None:
    import lsm_split
    from rocksdict import Options, Rdict

    directory = tmp_path / "db"
    directory.mkdir()
    lsm_split.fill(3000, 1000, 4, "split", directory)
    names = [f"t{number}" for number in range(4)]
    assert sorted(Rdict.list_cf(str(directory), Options(raw_mode=True))) == ["default", *names]
    families = {name: Options(raw_mode=True) for name in ["default", *names]}
    database = Rdict(str(directory), Options(raw_mode=True), column_families=families)
    try:
        assert list(database.keys()) == []  # nothing in the default family
        counts = []
        for number, name in enumerate(names):
            keys = list(database.get_column_family(name).keys())
            counts.append(len(keys))
            assert all(key[:1] == b"t" and lsm_split.TOKEN_ALPHABET.index(chr(key[1])) % 4 == number for key in keys)
        assert sum(counts) == 3000 and min(counts) > 0
    finally:
        database.close()
    with pytest.raises(SystemExit):
        lsm_split.main(["--families", "33"])


def test_the_store_growth_bench_fills_with_idempotent_commands_each_recorded(tmp_path: Path) -> None:
    import store_growth

    from tokenvault.core.store import VaultStore
    from tokenvault.core.store_layout import IDEMPOTENCY

    store = VaultStore.open(tmp_path / "store")
    try:
        summary = store_growth._fill(store, 2500, 1000, "default", idempotent_items=2)
        assert summary.startswith("filled at ")
        # 1,250 commands of two values: every one recorded under its own key, with its two tokens
        keys = [key for key in store._db.keys() if key[:1] == IDEMPOTENCY]
        assert len(keys) == 1250 and store.token_count() == 2500
    finally:
        store.close()
    with pytest.raises(SystemExit):
        store_growth.main(["--idempotent-items", "1001"])


@pytest.mark.parametrize("tuning", ["default", "universal", "no-compression"])
def test_the_store_growth_bench_prints_every_window_and_the_settled_cost(tuning: str, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import store_growth

    from tokenvault.core import store as store_module
    from tokenvault.core import store_layout

    options_before = store_layout.database_options, store_module.database_options
    store_growth.main(["--tokens", "45000", "--window", "20000", "--tuning", tuning, "--directory", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    windows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[0] for row in windows] == ["20,000", "40,000", "45,000"]  # 20,000 tokens an apply
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in windows)
    assert lines[-1].startswith("filled at ") and "bytes per value on disk" in lines[-1]
    assert list(tmp_path.iterdir()) == []  # the store is gone
    # and the tuning with it: every store opened afterwards has the store's own options
    assert (store_layout.database_options, store_module.database_options) == options_before


async def test_a_tokenize_load_with_a_ttl_asks_it_in_every_request_of_every_process() -> None:
    """bench/README.md, `--ttl-seconds`: each tokenize body carries the TTL, in the load processes too
    (the TTL travels in the Workload)."""
    import loadgen

    bodies: list[dict] = []

    async def tokenize(request: web.Request) -> web.Response:
        document = await request.json()
        bodies.append(document)
        return web.json_response({"tokens": [f"token-{value}" for value in document["values"]]})

    app = web.Application()
    app.router.add_post("/{prefix}/v1/tokenize", tokenize)
    async with local_server(app) as base_url:
        workload = loadgen.Workload("vault", "tokenize", (f"{base_url}/w0",), batch=2, api_key="k", ttl_seconds=60)
        assert loadgen.Workload.from_json(workload.to_json()) == workload
        measurement = await loadgen.drive(workload, 2, 0.3, 0.1, "raw", processes=2)
    assert measurement.errors == Counter() and measurement.requests > 0
    assert bodies and all(body["ttl_seconds"] == 60 and len(body["values"]) == 2 for body in bodies)


async def test_the_shred_serving_bench_streams_deletes_beside_a_load_and_reports_each_nodes_passes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/shred_serving.py against a real one-node cluster, a few seconds: every delete acknowledged,
    the node's passes counted from tokenvault_shred_pass_seconds, and the drain seen through
    tokenvault_shred_oldest_wait_seconds."""
    import asyncio

    import shred_serving
    from loadgen import free_ports

    from tokenvault.devcluster import cluster

    directory = tmp_path / "cluster"
    http_port, peer_port = free_ports(2)
    await asyncio.to_thread(cluster.init_cluster, directory, 1, ports=[(http_port, peer_port)])
    await asyncio.to_thread(cluster.start_cluster, directory, timeout_seconds=60)
    try:
        assert await shred_serving.main(["--cluster-json", str(directory / cluster.CLUSTER_FILE_NAME),
                                         "--rates", "200", "--seconds", "4", "--no-baseline",
                                         "--concurrency", "2"]) == 0
    finally:
        await asyncio.to_thread(cluster.stop_cluster, directory, 10)
    printed = capsys.readouterr().out
    assert "200 deletes a second of 100 tokens for 4 s (800 tokens to delete" in printed
    acknowledged = re.search(r"deletes: (\d+) requests acknowledged \(([\d,]+) tokens", printed)
    assert acknowledged is not None and int(acknowledged.group(2).replace(",", "")) >= 400, printed
    assert "errors none" in printed.split("deletes:")[1].splitlines()[0]
    passes = re.search(r"n1 \(primary\): backlog at most [\d,]+ rows, oldest delete waited at most [\d.]+ s; "
                       r"(\d+) shred passes", printed)
    assert passes is not None and int(passes.group(1)) >= 1, printed
    assert "every node's deletes shredded" in printed


@pytest.mark.parametrize("codec", [False, True])
def test_the_core_throughput_bench_commits_what_it_proposes(codec: bool) -> None:
    """bench/core_throughput.py drives three replicas by hand; before 2026-12-07 its loop sent only the
    messages that leave before the fsync, so no vote ever arrived and it ran forever."""
    import core_throughput

    for batch in (1, 100):
        elapsed, committed = core_throughput.measure(300, batch, 64, codec)
        assert committed == 300 and elapsed > 0
