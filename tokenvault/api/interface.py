"""What the HTTP layer needs of the service: NodeService in a one-process node, RemoteService in a worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from tokenvault import auth
from tokenvault.core import commands
from tokenvault.errors import Outcome


class BackupSource(Protocol):
    """A backup being streamed: tokenvault.core.backup.BackupStream, or a worker's RemoteBackupStream."""

    index: int
    view: int
    total_bytes: int
    sent_bytes: int

    def chunks(self, chunk_bytes: int = ...) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class VaultService(Protocol):
    node_id: str

    def api_key(self, key_id: str) -> auth.RuntimeKey | None: ...

    async def read_health(self) -> dict[str, Any]: ...

    async def tokenize(self, principal: str, values: list[str], idempotency_key: str | None,
                       token_format: str = ..., metadata_json: str | None = None,
                       ttl_seconds: int | None = None) -> Outcome: ...

    async def detokenize(self, tokens: list[str], actor: commands.Actor | None = None) -> list[str | None]: ...

    async def reveal(self, tokens: list[str], actor: commands.Actor | None = None, epoch: int | None = None,
                     include_metadata: bool = False, masked: bool = False) -> dict[str, Any]: ...

    async def rotate_epoch(self, principal: str, idempotency_key: str | None,
                           actor: commands.Actor | None = None) -> Outcome: ...

    async def list_epochs(self, key_id: str | None = None) -> dict[str, Any]: ...

    async def create_key(self, name: str, scopes: list[str], actor: commands.Actor) -> Outcome: ...

    async def revoke_key(self, key_id: str, actor: commands.Actor) -> Outcome: ...

    async def list_keys(self, key_id: str | None = None) -> dict[str, Any]: ...

    async def audit_page(self, after: int, limit: int) -> dict[str, Any]: ...

    async def cluster_view(self) -> dict[str, Any]: ...

    async def open_backup(self) -> BackupSource: ...

    async def delete_tokens(self, tokens: list[str], actor: commands.Actor | None = None,
                            epoch: int | None = None) -> Outcome: ...

    async def retokenize(self, tokens: list[str], actor: commands.Actor | None = None,
                         epoch: int | None = None) -> dict[str, Any]: ...

    async def epoch_tokens(self, epoch: int, after: str | None, limit: int,
                           key_id: str | None = None) -> dict[str, Any]: ...

    async def destroy_epoch(self, epoch: int, actor: commands.Actor | None = None) -> Outcome: ...

    async def trim_audit(self, through_seq: int, through_hash: bytes,
                         actor: commands.Actor | None = None) -> Outcome: ...

    async def list_members(self, key_id: str | None = None) -> dict[str, Any]: ...

    async def change_member(self, action: str, node_id: str, peer_addr: str | None,
                            key_id: str | None = None) -> Outcome: ...

    async def close(self) -> None: ...
