"""Streams, events and asynchronous copies: what WaS needs from a device, on CUDA and on a fake.

CudaStreams is torch.cuda's streams and events. FakeStreams runs the same calls on the CPU the way a GPU
could: each call only queues work on its stream, and `drain` then executes the queues in an order drawn
at random among those the events allow, so a test of the ring that orders its copies by events sees
every interleaving a GPU might choose, not the one the code was written in.

Semantics (CUDA's): `record(event)` marks the current stream's work so far; `wait(event)` makes later
work on the current stream wait for the work marked by the event's latest record at the time of the
call; waiting on an event never recorded waits for nothing.
"""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Callable, Iterator

import torch


class CudaStreams:
    def stream(self):
        return torch.cuda.Stream()

    def event(self):
        return torch.cuda.Event()

    @contextlib.contextmanager
    def on(self, stream) -> Iterator[None]:
        with torch.cuda.stream(stream):
            yield

    def record(self, event) -> None:
        event.record(torch.cuda.current_stream())

    def wait(self, event) -> None:
        torch.cuda.current_stream().wait_event(event)

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        target.copy_(source, non_blocking=True)

    def launch(self, work: Callable[[], None]) -> None:
        work()  # kernels are queued on the current stream as they are called


class _FakeEvent:
    def __init__(self):
        self.recorded: object | None = None  # the marker op of the latest record, or None


class FakeStreams:
    """Queued work per stream, executed by `drain` in a random order that respects the events."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.compute = deque()  # the stream work goes to outside `on`
        self.queues = [self.compute]
        self.current = self.compute
        self.done: set[int] = set()  # ids of executed marker ops

    def stream(self) -> deque:
        queue: deque = deque()
        self.queues.append(queue)
        return queue

    def event(self) -> _FakeEvent:
        return _FakeEvent()

    @contextlib.contextmanager
    def on(self, stream: deque) -> Iterator[None]:
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def record(self, event: _FakeEvent) -> None:
        marker = object()
        event.recorded = marker
        self.current.append(("mark", marker))

    def wait(self, event: _FakeEvent) -> None:
        if event.recorded is not None:
            self.current.append(("wait", event.recorded))

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        self.current.append(("run", lambda: target.copy_(source)))

    def launch(self, work: Callable[[], None]) -> None:
        self.current.append(("run", work))

    def drain(self) -> None:
        """Execute every queued op: each time, the head op of a stream chosen at random among those
        whose head may run now (a wait whose marked work has executed, or any other op)."""
        while any(self.queues):
            ready = [q for q in self.queues if q and self._may_run(q[0])]
            if not ready:
                raise RuntimeError("the streams wait on each other: a deadlock")
            kind, payload = self.rng.choice(ready).popleft()
            if kind == "mark":
                self.done.add(id(payload))
            elif kind == "run":
                payload()

    def _may_run(self, op: tuple) -> bool:
        kind, payload = op
        return kind != "wait" or id(payload) in self.done
