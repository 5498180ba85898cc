"""The client library users import, sync and async (vault.py): HTTP and TLS only, nothing of a node. The
`tokenvault` command is tokenvault/cli/."""
