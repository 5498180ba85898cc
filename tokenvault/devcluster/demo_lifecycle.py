"""The demo's lifecycle act (`./run_cluster.sh demo`, step 7): a card token, a masked reveal, delete,
migrate and destroy, checked.

It starts with a format-preserving card token of one of the demo's card numbers
(same length, last four digits kept, never Luhn-valid) and its detokenize with
the `masked` bootstrap key, which sees only the last four digits. After the rotation act the demo's values live in the retired epoch. This act
deletes a few of their tokens (every node answers null at once), migrates the
whole retired epoch into the active one with the same two requests
`tokenvault admin epoch migrate` pages through (`GET
/v1/admin/epochs/{epoch}/tokens`, `POST /v1/retokenize`), and then destroys
the retired epoch: its tokens detokenize to null everywhere, re-tokenizing one
is refused, and every value that was migrated still detokenizes under its new
token. Values appear only as the result of a detokenize (Demo.show_detokenize).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tokenvault.client.vault import AsyncClient, Unprocessable
from tokenvault.crypto.formats import luhn_valid, mask_value, normalize_card
from tokenvault.devcluster.cluster_spec import ClusterSpec


class Demo(Protocol):
    """What this act takes from the demo that runs it (tokenvault/devcluster/demo.py): the cluster, the
    values and their tokens so far, how to speak and check, and the reads it shares with other acts."""

    spec: ClusterSpec
    values: list[str]
    tokens: dict[str, str]

    def say(self, text: str) -> None: ...

    def check(self, holds: bool, claim: str) -> None: ...

    def client(self, urls: Sequence[str], deadline_seconds: float = ...) -> AsyncClient: ...

    async def show_detokenize(self, tokens: list[str]) -> None: ...

    async def detokenize_all(self, urls: Sequence[str], tokens: dict[str, str]) -> bool: ...

    async def list_epochs(self) -> str: ...

DELETED_VALUES = 3
MIGRATE_PAGE_TOKENS = 500


async def lifecycle_act(demo: Demo) -> None:
    demo.say("\n7. Token lifecycle: a card token, a masked reveal, delete, migrate an epoch, destroy it "
             "(crypto-shredding):")
    await _card_and_masked_reveal(demo)
    doomed = [demo.tokens[value] for value in demo.values[-DELETED_VALUES:]]
    async with demo.client(demo.spec.http_urls) as vault:
        deleted = await vault.delete_tokens(doomed)
    demo.say(f"   POST /v1/tokens/delete of {len(doomed)} tokens: {deleted} mappings removed")
    everywhere = True
    for node in demo.spec.nodes:
        async with demo.client([node.http_url]) as vault:
            everywhere = everywhere and await vault.detokenize(doomed) == (None,) * len(doomed)
    demo.check(deleted == len(doomed) and everywhere, "every node at once answers null for the deleted tokens")
    for value in demo.values[-DELETED_VALUES:]:
        del demo.tokens[value]

    old_epoch = int(next(iter(demo.tokens.values()))[2:].split("_", 1)[0])
    migrated: dict[str, str] = {}
    async with demo.client(demo.spec.http_urls) as vault:
        after: str | None = None
        while True:
            page = await vault.epoch_tokens(old_epoch, after, MIGRATE_PAGE_TOKENS)
            if not page.tokens:
                break
            # Why: card and digits tokens carry no epoch; without it they are looked up in the active
            # epoch, answer null, and the destroy below would take their values with it.
            result = await vault.retokenize(page.tokens, epoch=old_epoch)
            migrated.update((old, new) for old, new in zip(page.tokens, result.tokens) if new is not None)
            after = page.tokens[-1]
        active = (await vault.list_epochs()).active_epoch
    demo.say(f"   migrated epoch {old_epoch} to epoch {active}: {len(migrated)} tokens re-tokenized inside the "
             "vault (no value left it)")
    demo.check(all(token in migrated for token in demo.tokens.values()),
               f"every token of the demo in epoch {old_epoch} has a new token in epoch {active}")

    async with demo.client(demo.spec.http_urls) as vault:
        state = await vault.destroy_epoch(old_epoch)
        demo.say(f"   POST /v1/admin/epochs/{old_epoch}/destroy: epoch {old_epoch} is {state}")
        sample = [demo.tokens[value] for value in demo.values[:2]]
        refused = False
        try:
            await vault.retokenize(sample[:1])
        except Unprocessable:
            refused = True
    demo.check(await _all_null(demo, list(demo.tokens.values())),
               f"every node answers null for all {len(demo.tokens)} tokens of epoch {old_epoch}")
    demo.check(refused, f"re-tokenizing a token of the destroyed epoch {old_epoch} is refused (422)")
    demo.say("   the migrated tokens of the same values:")
    await demo.show_detokenize([migrated[token] for token in sample])
    new_tokens = {value: migrated[token] for value, token in demo.tokens.items()}
    demo.check(await demo.detokenize_all(demo.spec.http_urls, new_tokens),
               f"all {len(new_tokens)} migrated values still detokenize under their epoch-{active} tokens")
    demo.say(f"   epochs: {await demo.list_epochs()}")


async def _card_and_masked_reveal(demo: Demo) -> None:
    card = normalize_card(demo.values[0])
    async with demo.client(demo.spec.http_urls) as vault:
        (card_token,) = (await vault.tokenize([card], token_format="card")).tokens
    demo.say(f"   POST /v1/tokenize with \"format\": \"card\": {card_token}")
    demo.check(len(card_token) == len(card) and card_token.isdigit() and card_token[-4:] == card[-4:]
               and not luhn_valid(card_token) and card_token != card,
               "the card token has the card's length and last four digits, and is never Luhn-valid")
    masked_client = AsyncClient(demo.spec.http_urls, demo.spec.key("masked"), timeout_seconds=3.0,
                                deadline_seconds=15.0, retry_after_cap_seconds=0.5, ca_file=demo.spec.ca_file)
    async with masked_client as vault:
        (masked,) = await vault.detokenize([card_token])
    demo.say(f"   detokenize of the card token with the 'masked' key: {masked}")
    demo.check(masked == mask_value(card), "the masked key sees only the last four digits")


async def _all_null(demo: Demo, tokens: list[str]) -> bool:
    for node in demo.spec.nodes:
        async with demo.client([node.http_url]) as vault:
            for start in range(0, len(tokens), 500):
                if set(await vault.detokenize(tokens[start:start + 500])) != {None}:
                    return False
    return True
