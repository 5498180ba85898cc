"""The core process: the replica driver (node), its WAL, store, peer transport, snapshots and sealer."""
