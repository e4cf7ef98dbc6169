"""WaS (weight-as-a-service): a few local slots that a background thread fills with remote layers.

The remote layers are used in the same order every WaS step, so the cache is a ring: the prefetcher
copies remote layer k+1, k+2, ... into free slots while layer k computes, and wraps from the last
remote layer of a step to the first of the next. Slots are allocated once and reused. A step served
another way (CaS) leaves the ring where it is: the slots stay filled for the next WaS step.
"""

from __future__ import annotations

import threading
import time

import torch

from sidp.model.decoder import Weights

CHECK_S = 0.5  # how often a compute step waiting on a slot checks that the prefetcher still runs


def copy_piece(copy_into, slot: Weights, piece: Weights) -> None:
    """One layer's pooled weights from a peer view into a slot, tensor by tensor."""
    for name, target in slot.items():
        copy_into(target, piece[name])


class WeightCache:
    def __init__(self, order: list[int], peers: dict[int, Weights], slots: int, copy_into):
        self.order = order  # remote layers, in the order the forward pass uses them
        self.peers = peers  # layer -> the owner's tensors, mapped into this process
        self.copy_into = copy_into  # the transport's copy from a peer view into a slot
        self.slots = [{n: torch.empty_like(t) for n, t in peers[order[0]].items()} for _ in range(slots)]
        self._slot_bytes = sum(t.nbytes for t in self.slots[0].values())
        self._free = threading.Semaphore(slots)
        self._filled = [threading.Semaphore(0) for _ in range(slots)]
        self._next_use = 0
        self.bytes_fetched = 0
        self.wait_s = 0.0
        self.last_copy_s = 0.0  # how long the latest layer took to copy, as the run goes
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._prefetch, name="sidp-was-prefetch", daemon=True)
        self._thread.start()

    def _prefetch(self) -> None:
        try:
            self._fill_forever()
        except BaseException as error:  # acquire() raises it instead of waiting forever
            self.error = error

    def _fill_forever(self) -> None:
        position = 0
        while True:
            self._free.acquire()
            index = position % len(self.slots)
            source = self.peers[self.order[position % len(self.order)]]
            started = time.perf_counter()
            copy_piece(self.copy_into, self.slots[index], source)
            self.last_copy_s = time.perf_counter() - started
            self.bytes_fetched += self._slot_bytes
            self._filled[index].release()
            position += 1

    def acquire(self, layer: int) -> Weights:
        """The weights of `layer`, which must be the next remote layer in order; blocks until copied."""
        assert self.order[self._next_use % len(self.order)] == layer, "remote layers used out of order"
        index = self._next_use % len(self.slots)
        started = time.perf_counter()
        while not self._filled[index].acquire(timeout=CHECK_S):
            self.check()
        self.wait_s += time.perf_counter() - started
        return self.slots[index]

    def check(self) -> None:
        """Raise what stopped the prefetch thread, if it stopped."""
        if not self._thread.is_alive():
            raise RuntimeError(f"the WaS prefetch thread stopped: {self.error!r}") from self.error

    def release(self) -> None:
        self._next_use += 1
        self._free.release()
