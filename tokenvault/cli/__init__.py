"""The `tokenvault` command: `serve` runs a node (tokenvault.serve), `admin ...` operates a cluster through
the client library (tokenvault.client) or, offline, a node's data directory (restore)."""
