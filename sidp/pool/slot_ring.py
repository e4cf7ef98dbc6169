"""WaS on a GPU: a fixed ring of slots that a copy stream fills with remote layers, ordered by events, so
the host never waits for a copy and compute never reads a slot before it is filled.

The remote layers are used in the same order every step, so the ring runs ahead: after compute releases
slot i (an event recorded on the compute stream behind the layer's kernels), the copy stream is told to
wait for that event and then refill slot i with the layer `slots` places further on, and records the
slot's "filled" event; compute waits for that event before the layer that reads it. Slot addresses
never change (CUDA graphs stay valid). The streams come from sidp.pool.streams: CUDA's, or the fake
that tests the ordering on a CPU.
"""

from __future__ import annotations

from sidp.model.decoder import Weights


class SlotRing:
    def __init__(self, streams, order: list[int], peers: dict[int, Weights], slots: int):
        """order: the remote layers in the order a forward pass uses them; peers: layer -> the owner's
        tensors, readable here (CUDA IPC views)."""
        self.streams = streams
        self.order = order
        self.peers = peers
        self.copy_stream = streams.stream()
        first = peers[order[0]]
        self.slots = [{name: t.new_empty(t.shape) for name, t in first.items()} for _ in range(slots)]
        self.filled = [streams.event() for _ in range(slots)]
        self.released = [streams.event() for _ in range(slots)]
        self.next_fill = 0  # place in the endless sequence of remote layers of the next copy
        self.next_use = 0
        for _ in range(slots):
            self._fill()

    def _fill(self) -> None:
        index = self.next_fill % len(self.slots)
        source = self.peers[self.order[self.next_fill % len(self.order)]]
        streams = self.streams
        with streams.on(self.copy_stream):
            streams.wait(self.released[index])  # compute has finished with the slot's last layer
            for name, target in self.slots[index].items():
                streams.copy(target, source[name])
            streams.record(self.filled[index])
        self.next_fill += 1

    def acquire(self, layer: int) -> Weights:
        """The slot holding `layer` (the next remote layer in order), once compute waits for its copy."""
        if self.order[self.next_use % len(self.order)] != layer:
            raise RuntimeError(f"remote layer {layer} used out of order")
        index = self.next_use % len(self.slots)
        self.streams.wait(self.filled[index])
        return self.slots[index]

    def release(self) -> None:
        """After the layer's kernels are queued: the slot may be refilled once they have run."""
        index = self.next_use % len(self.slots)
        self.streams.record(self.released[index])
        self.next_use += 1
        self._fill()
