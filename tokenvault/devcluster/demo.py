"""The narrated live demo behind `./run_cluster.sh demo`, run against a running cluster.

It shows, checking each claim as it goes: concurrent tokenizes through every
node, deterministic tokens, a SIGKILL of the primary with a new primary elected
and service continuing, every earlier token still detokenizing, the killed node
restarted and caught up, an epoch rotation (new tokens in the new epoch,
old tokens still detokenizable) and the token lifecycle (a delete, the old
epoch migrated and destroyed; tokenvault/devcluster/demo_lifecycle.py). At the
end it prints the node log events that tell the same story.

The values are made-up card numbers. The demo prints a value only on a
"detokenize ... -> value" line, i.e. as the result of a detokenize.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tokenvault.devcluster import cluster
from tokenvault.client.vault import AsyncClient, VaultError
from tokenvault.devcluster.cluster import ClusterSpec, NodeStatus
from tokenvault.devcluster.demo_lifecycle import lifecycle_act

Say = Callable[[str], None]
CLIENTS = 16
VALUES = 400
BATCH_VALUES = 25
FAILOVER_DEADLINE_SECONDS = 20.0
CATCH_UP_DEADLINE_SECONDS = 30.0
EPOCH_VISIBLE_DEADLINE_SECONDS = 5.0
STORY_EVENTS = ("node.started", "primary.elected", "peer.down", "peer.up", "node.recovered", "epoch.rotated",
                "tokens.deleted", "epoch.destroyed", "shred.done")
_SAFE_FIELD_TEXT = re.compile(r"[A-Za-z0-9_.:/-]{1,48}\Z")
_HIDDEN_FIELD_WORDS = ("key", "secret", "value", "token", "password")


class DemoFailed(Exception):
    """A claim the demo checks did not hold."""


def fake_card_numbers(count: int, seed: int) -> list[str]:
    """Distinct made-up 16-digit numbers with a valid Luhn check digit, in the 4000 00xx test range."""
    generator = random.Random(seed)
    numbers: set[str] = set()
    while len(numbers) < count:
        digits = [4, 0, 0, 0, 0, 0] + [generator.randrange(10) for _ in range(9)]
        total = 0
        for position, digit in enumerate(reversed(digits)):
            doubled = digit * 2 if position % 2 == 0 else digit
            total += doubled - 9 if doubled > 9 else doubled
        digits.append((10 - total % 10) % 10)
        text = "".join(map(str, digits))
        numbers.add(" ".join(text[start:start + 4] for start in range(0, 16, 4)))
    return sorted(numbers)


class Demo:
    def __init__(self, spec: ClusterSpec, say: Say) -> None:
        self.spec = spec
        self.say = say
        self.key = spec.key("full")
        self.values = fake_card_numbers(VALUES, seed=time.time_ns())
        self.tokens: dict[str, str] = {}
        self.started_at = datetime.now(timezone.utc)
        self.checks_failed = 0

    def client(self, urls: Sequence[str], deadline_seconds: float = 15.0) -> AsyncClient:
        return AsyncClient(urls, self.key, timeout_seconds=3.0, deadline_seconds=deadline_seconds,
                           retry_after_cap_seconds=0.5, ca_file=self.spec.ca_file)

    def check(self, holds: bool, claim: str) -> None:
        self.say(f"   [{'ok' if holds else 'FAILED'}] {claim}")
        if not holds:
            self.checks_failed += 1

    def urls_from(self, first_node_id: str) -> list[str]:
        """Every node URL, starting with the given node's (so requests go there first)."""
        ids = [node.node_id for node in self.spec.nodes]
        start = ids.index(first_node_id)
        return [self.spec.node(node_id).http_url for node_id in ids[start:] + ids[:start]]

    async def statuses(self) -> list[NodeStatus]:
        return await asyncio.to_thread(cluster.cluster_status, self.spec)

    async def show_cluster(self, title: str) -> list[NodeStatus]:
        self.say(title)
        statuses = await self.statuses()
        for status in statuses:
            self.say("     " + status.describe())
        return statuses

    async def run(self) -> int:
        self.say(f"TokenVault demo against {len(self.spec.nodes)} node(s) in {self.spec.directory}\n")
        statuses = await self.show_cluster("1. The cluster as every node reports it (GET /health):")
        primary = cluster.primary_of(statuses)
        if primary is None or any(status.health is None for status in statuses):
            raise DemoFailed(f"every node must be up with a primary elected: run "
                             f"'{cluster.run_cluster_command(self.spec.directory, 'start')}' first")
        await self.concurrent_tokenize()
        await self.determinism()
        if len(self.spec.nodes) >= 3:
            killed = await self.failover(primary)
        else:
            self.say("\n4. Failover needs 3 nodes or more (start with --nodes 3); this 1-node cluster shows "
                     "crash recovery instead.")
            killed = primary
            await asyncio.to_thread(cluster.kill_node, self.spec.directory, killed, self.narrate)
        await self.recovery(killed)
        await self.rotation()
        await lifecycle_act(self)
        self.print_story()
        verdict = "all checks passed" if self.checks_failed == 0 else f"{self.checks_failed} check(s) FAILED"
        self.say(f"\nDemo finished: {verdict}.")
        return 0 if self.checks_failed == 0 else 1

    def narrate(self, message: str) -> None:
        self.say(f"   {message}")

    async def concurrent_tokenize(self) -> None:
        node_ids = [node.node_id for node in self.spec.nodes]
        self.say(f"\n2. {CLIENTS} concurrent clients tokenize {VALUES} made-up card numbers, in overlapping "
                 f"batches of {BATCH_VALUES}, each client starting at a different node ({', '.join(node_ids)}):")
        generator = random.Random(7)
        answers: list[tuple[str, str, int]] = []

        async def one_client(number: int) -> None:
            async with self.client(self.urls_from(node_ids[number % len(node_ids)])) as vault:
                order = self.values[:]
                generator.shuffle(order)
                for start in range(0, VALUES // 2, BATCH_VALUES):
                    batch = order[start:start + BATCH_VALUES]
                    result = await vault.tokenize(batch)
                    answers.extend((value, token, result.epoch) for value, token in zip(batch, result.tokens))

        began = time.monotonic()
        await asyncio.gather(*(one_client(number) for number in range(CLIENTS)))
        elapsed_seconds = time.monotonic() - began
        async with self.client(self.spec.http_urls) as vault:
            missing = [value for value in self.values if value not in {answer[0] for answer in answers}]
            if missing:
                result = await vault.tokenize(missing)
                answers.extend((value, token, result.epoch) for value, token in zip(missing, result.tokens))
        tokens_per_value: dict[str, set[str]] = {}
        for value, token, _ in answers:
            tokens_per_value.setdefault(value, set()).add(token)
        self.tokens = {value: next(iter(tokens)) for value, tokens in tokens_per_value.items()}
        self.say(f"   {len(answers)} value submissions acknowledged in {elapsed_seconds:.2f} s; "
                 f"{len(self.tokens)} distinct values")
        self.check(all(len(tokens) == 1 for tokens in tokens_per_value.values()),
                   "every submission of the same value, through any node, got the same token")
        self.check(len(set(self.tokens.values())) == len(self.tokens), "no two values share a token")

    async def determinism(self) -> None:
        sample = self.values[:2]
        self.say("\n3. Determinism: the same values tokenized once more through each node separately:")
        same = True
        for node in self.spec.nodes:
            async with self.client([node.http_url]) as vault:
                result = await vault.tokenize(sample)
            self.say(f"   via {node.node_id}: {'  '.join(result.tokens)}")
            same = same and list(result.tokens) == [self.tokens[value] for value in sample]
        self.check(same, "every node returned exactly the tokens issued earlier")
        await self.show_detokenize([self.tokens[value] for value in sample])

    async def show_detokenize(self, tokens: list[str]) -> None:
        """The only place the demo prints values: as the result of a detokenize."""
        async with self.client(self.spec.http_urls) as vault:
            values = await vault.detokenize(tokens)
        for token, value in zip(tokens, values):
            self.say(f"   detokenize {token} -> {value if value is not None else 'unknown token'}")

    async def detokenize_all(self, urls: Sequence[str], tokens: dict[str, str]) -> bool:
        async with self.client(urls) as vault:
            items = list(tokens.items())
            for start in range(0, len(items), 500):
                chunk = items[start:start + 500]
                values = await vault.detokenize([token for _, token in chunk])
                if list(values) != [value for value, _ in chunk]:
                    return False
        return True

    async def failover(self, primary: str) -> str:
        self.say(f"\n4. Failure: SIGKILL of the primary {primary} (no graceful shutdown).")
        survivors = [node.node_id for node in self.spec.nodes if node.node_id != primary]
        await asyncio.to_thread(cluster.kill_node, self.spec.directory, primary, self.narrate)
        killed_at = time.monotonic()
        new_primary = await self.wait_for_new_primary(survivors, killed_at)
        fresh = fake_card_numbers(VALUES + 50, seed=time.time_ns())[-50:]
        async with self.client([self.spec.node(node_id).http_url for node_id in survivors],
                               FAILOVER_DEADLINE_SECONDS) as vault:
            result = await vault.tokenize(fresh)
        served_seconds = time.monotonic() - killed_at
        self.tokens.update(zip(fresh, result.tokens))
        self.say(f"   tokenize of {len(fresh)} new values acknowledged {served_seconds:.2f} s after the kill "
                 f"(primary now {new_primary})")
        survivor_urls = [self.spec.node(node_id).http_url for node_id in survivors]
        self.check(new_primary is not None and new_primary != primary, "a new primary was elected")
        self.check(await self.detokenize_all(survivor_urls, self.tokens),
                   f"all {len(self.tokens)} tokens issued so far detokenize to their values on the survivors")
        await self.show_cluster("   The cluster now:")
        return primary

    async def wait_for_new_primary(self, survivors: list[str], killed_at: float) -> str | None:
        deadline = killed_at + FAILOVER_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            statuses = await asyncio.to_thread(cluster.cluster_status, self.spec, 1.0, survivors)
            leaders = [status.node_id for status in statuses if status.field("role") == "primary"]
            if leaders:
                self.say(f"   new primary {leaders[0]} elected {time.monotonic() - killed_at:.2f} s after the kill")
                return leaders[0]
            await asyncio.sleep(0.05)
        self.say(f"   no new primary within {FAILOVER_DEADLINE_SECONDS:g} s")
        return None

    async def recovery(self, node_id: str) -> None:
        self.say(f"\n5. Recovery: restart {node_id} with its existing data directory.")
        began = time.monotonic()
        await asyncio.to_thread(cluster.restart_node, self.spec.directory, node_id, 30.0, self.narrate)
        caught_up = await self.wait_caught_up(node_id)
        self.check(caught_up, f"{node_id} caught up with the primary ({time.monotonic() - began:.2f} s after restart)")
        ok = await self.detokenize_all([self.spec.node(node_id).http_url], self.tokens)
        self.check(ok, f"all {len(self.tokens)} tokens, including those issued while it was down, "
                       f"detokenize through {node_id} alone")

    async def wait_caught_up(self, node_id: str) -> bool:
        deadline = time.monotonic() + CATCH_UP_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            statuses = {status.node_id: status for status in await self.statuses()}
            primary = cluster.primary_of(list(statuses.values()))
            applied = statuses[node_id].field("applied_index")
            target = statuses[primary].field("commit_index") if primary in statuses else None
            if isinstance(applied, int) and isinstance(target, int) and applied >= target:
                self.say(f"   {node_id}: applied index {applied}, primary {primary} commit index {target}")
                return True
            await asyncio.sleep(0.1)
        return False

    async def rotation(self) -> None:
        self.say("\n6. Epoch rotation (POST /v1/admin/epochs):")
        sample = self.values[:2]
        async with self.client(self.spec.http_urls) as vault:
            old_epoch = (await vault.list_epochs()).active_epoch
            rotated = await vault.rotate_epoch()
            acknowledged_at = time.monotonic()
            self.say(f"   epoch {old_epoch} -> epoch {rotated.epoch}")
            visible = await self.wait_epoch_everywhere(rotated.epoch, acknowledged_at)
            self.check(visible, f"every node's /health shows epoch {rotated.epoch} within "
                                f"{EPOCH_VISIBLE_DEADLINE_SECONDS:g} s")
            result = await vault.tokenize(sample)
            for token in result.tokens:
                self.say(f"   same value, new token: {token}")
            self.check(result.epoch >= rotated.epoch and all(token.startswith(f"tv{result.epoch}_")
                                                             for token in result.tokens),
                       f"new tokens are issued in epoch {result.epoch}")
        self.say("   the old tokens of the same values:")
        await self.show_detokenize([self.tokens[value] for value in sample])
        self.check(await self.detokenize_all(self.spec.http_urls, self.tokens),
                   f"all {len(self.tokens)} tokens of earlier epochs still detokenize")
        epochs = await self.list_epochs()
        self.say(f"   epochs: {epochs}")

    async def list_epochs(self) -> str:
        async with self.client(self.spec.http_urls) as vault:
            listed = await vault.list_epochs()
        return ", ".join(f"{entry.epoch} ({entry.state})" for entry in listed.epochs)

    async def wait_epoch_everywhere(self, epoch: int, since: float) -> bool:
        while time.monotonic() - since < EPOCH_VISIBLE_DEADLINE_SECONDS:
            statuses = await self.statuses()
            if all(status.field("active_epoch") == epoch for status in statuses):
                self.say(f"   all nodes report active epoch {epoch} {time.monotonic() - since:.2f} s after "
                         f"the acknowledgement")
                return True
            await asyncio.sleep(0.05)
        return False

    def print_story(self) -> None:
        self.say("\n8. What the node logs recorded during the demo:")
        events = []
        for node in self.spec.nodes:
            for record in read_log_events(node.log_file, self.started_at):
                events.append((record.get("ts", ""), node.node_id, record))
        for timestamp, node_id, record in sorted(events, key=lambda item: item[0]):
            self.say(f"   {timestamp}  {node_id}  {record['event']:<16} {describe_fields(record)}")
        if not events:
            self.say("   (no story events found in the node logs)")


def read_log_events(path: Path | str, since: datetime) -> list[dict[str, Any]]:
    """The story events of one node log written at or after `since` (bad lines are skipped)."""
    records: list[dict[str, Any]] = []
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except OSError:
        return records
    with handle:
        for line in handle:
            try:
                record = json.loads(line)
                written_at = datetime.fromisoformat(str(record.get("ts", "")).replace("Z", "+00:00"))
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") in STORY_EVENTS and written_at >= since:
                records.append(record)
    return records


def describe_fields(record: dict[str, Any]) -> str:
    """Short, safe key=value pairs of a log record: numbers and plain identifiers only."""
    pieces = []
    for name, value in record.items():
        if name in ("ts", "level", "node", "event", "logger") or any(word in name for word in _HIDDEN_FIELD_WORDS):
            continue
        if isinstance(value, bool) or isinstance(value, int):
            pieces.append(f"{name}={value}")
        elif isinstance(value, str) and _SAFE_FIELD_TEXT.match(value):
            pieces.append(f"{name}={value}")
        elif isinstance(value, list) and all(isinstance(item, str) and _SAFE_FIELD_TEXT.match(item)
                                             for item in value[:8]):
            pieces.append(f"{name}={','.join(value[:8])}")
    return " ".join(pieces)


def run_demo(spec: ClusterSpec, say: Say = print) -> int:
    """Run the demo; returns 0 when every check held, 1 otherwise."""
    try:
        return asyncio.run(Demo(spec, say).run())
    except DemoFailed as error:
        say(f"demo stopped: {error}")
        return 1
    except VaultError as error:
        say(f"demo stopped: the cluster answered with an error: {error}")
        return 1
