"""The GPU WaS ring's ordering, on the fake streams: in every interleaving the events allow, each layer's
compute reads that layer's weights; a ring that skips the release wait is caught."""

from __future__ import annotations

import pytest
import torch

from sidp.pool.slot_ring import SlotRing
from sidp.pool.streams import FakeStreams

ORDER = [1, 2, 4, 5, 7]  # the remote layers of one replica


def peers() -> dict[int, dict[str, torch.Tensor]]:
    return {
        layer: {"w": torch.full((4,), float(layer)), "v": torch.full((2,), -float(layer))} for layer in ORDER
    }


def run_steps(ring: SlotRing, streams: FakeStreams, steps: int) -> list[str]:
    """Queue `steps` forward passes (each layer's compute checks what its slot holds), then drain."""
    wrong: list[str] = []
    for step in range(steps):
        for layer in ORDER:
            weights = ring.acquire(layer)

            def compute(weights=weights, layer=layer, step=step) -> None:
                seen = {float(weights["w"][0]), -float(weights["v"][0])}
                if seen != {float(layer)}:
                    wrong.append(f"step {step} layer {layer} read {sorted(seen)}")

            streams.launch(compute)
            ring.release()
    streams.drain()
    return wrong


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_every_interleaving_reads_the_right_layer(slots):
    for seed in range(60):
        streams = FakeStreams(seed)
        ring = SlotRing(streams, ORDER, peers(), slots)
        assert run_steps(ring, streams, 3) == [], f"seed {seed}"


class _NoReleaseWait(SlotRing):
    """The bug the events exist for: refill a slot without waiting for compute to release it."""

    def _fill(self) -> None:
        index = self.next_fill % len(self.slots)
        source = self.peers[self.order[self.next_fill % len(self.order)]]
        with self.streams.on(self.copy_stream):
            for name, target in self.slots[index].items():
                self.streams.copy(target, source[name])
            self.streams.record(self.filled[index])
        self.next_fill += 1


class _NoFillWait(SlotRing):
    """The other bug: compute reads a slot without waiting for its copy."""

    def acquire(self, layer: int):
        return self.slots[self.next_use % len(self.slots)]


@pytest.mark.parametrize("broken", [_NoReleaseWait, _NoFillWait])
def test_a_ring_that_skips_an_event_wait_is_caught(broken):
    caught = 0
    for seed in range(60):
        streams = FakeStreams(seed)
        caught += bool(run_steps(broken(streams, ORDER, peers(), 2), streams, 3))
    assert caught > 30  # most interleavings show it (59 and 60 of 60 when written)


def test_layers_out_of_order_are_refused():
    ring = SlotRing(FakeStreams(), ORDER, peers(), 2)
    with pytest.raises(RuntimeError, match="remote layer 2 used out of order"):
        ring.acquire(2)
