"""Token formats, masked reveal and expiry on a real three-node cluster (issue 13, parts 1, 2, 6):
a card token detokenizes on every node, backups included, in its epoch; a masked key sees only the
last four digits everywhere (the last four characters of opaque and digits values, never more than half); a mapping with a TTL reads null on every node once expired and is
purged by a replicated entry; neither the card number nor the metadata is written in plaintext."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from harness import ClusterHarness, wait_for, wait_for_async
from tokenvault.client.vault import Forbidden
from tokenvault.crypto.formats import luhn_valid

# The file scan lives with the in-process node helpers, beside the unit tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from node_support import files_holding  # noqa: E402

pytestmark = pytest.mark.integration

CARD = "5555-5555-5555-4444"
CARD_DIGITS = "5555555555554444"
EMAIL = "alice@example.com"
ACCOUNT = "1234567890"
METADATA_MARKER = "lifecycle-metadata-marker"
EXPIRY_DEADLINE_SECONDS = 10.0


def test_card_tokens_masking_and_expiry_on_every_node(make_cluster) -> None:
    harness: ClusterHarness = make_cluster(3)
    primary = harness.wait_for_primary()
    backups = [node_id for node_id in harness.node_ids if node_id != primary]

    async def scenario() -> None:
        async with harness.client(backups[0]) as writer:
            card = await writer.tokenize([CARD], token_format="card")
            (card_token,) = card.tokens
            assert len(card_token) == 16 and card_token.endswith("4444") and not luhn_valid(card_token)
            short = await writer.tokenize(["expires soon"], ttl_seconds=1, metadata={"m": METADATA_MARKER})
            lasting = await writer.tokenize(["stays"], ttl_seconds=3600, metadata={"m": "lasting"})
            opaque = await writer.tokenize([EMAIL, "abc"])
            digits = await writer.tokenize([ACCOUNT], token_format="digits")
        async with harness.node_clients() as clients, harness.node_clients(key="masked") as masked:
            for node_id in harness.node_ids:
                # Every node answers, a backup from its own store or through the primary.
                assert await clients[node_id].detokenize([card_token], epoch=card.epoch) == (CARD_DIGITS,)
                assert await masked[node_id].detokenize([card_token]) == ("************4444",)
                # docs/api.md, masked reveal: all but the last four characters, never more than half.
                assert await masked[node_id].detokenize(list(opaque.tokens)) == ("*************.com", "**c")
                assert await masked[node_id].detokenize(list(digits.tokens)) == ("******7890",)
                with pytest.raises(Forbidden):  # metadata is for keys that may see values
                    await masked[node_id].detokenize_with_metadata(list(short.tokens))
                found = await clients[node_id].detokenize_with_metadata([lasting.tokens[0], opaque.tokens[0]])
                assert (found.values, found.metadata) == (("stays", EMAIL), ({"m": "lasting"}, None))

            async def expired_everywhere() -> bool:
                answers = [await clients[node_id].detokenize([short.tokens[0], lasting.tokens[0]])
                           for node_id in harness.node_ids]
                return all(answer == (None, "stays") for answer in answers)

            await wait_for_async(expired_everywhere, EXPIRY_DEADLINE_SECONDS, "the TTL mapping to read null")

    mark = harness.log_mark(primary)
    asyncio.run(scenario())
    purged = wait_for(lambda: harness.find_events(primary, "expiry.purged", mark), EXPIRY_DEADLINE_SECONDS,
                      "the primary to purge the expired mapping")
    assert purged[0]["mappings"] >= 1
    for node in harness.nodes:
        root = node.data_dir.parent
        assert files_holding(root, CARD_DIGITS.encode()) == []
        assert files_holding(root, METADATA_MARKER.encode()) == []
