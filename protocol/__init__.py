"""The pure replication core: messages, frame codec and the replica state machine.

Nothing in this package performs I/O, reads a clock or draws randomness on its
own; the node driver in ``tokenvault.node`` feeds it messages and ticks and
carries out the ``Ready`` batches it returns.
"""

from protocol.types import INITIAL_HARD_STATE, Entry, EntryKind, HardState

__all__ = ["INITIAL_HARD_STATE", "Entry", "EntryKind", "HardState"]
