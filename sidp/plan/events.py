"""The group simulation's one clock and the two things replicas meet on: a GPU, which runs its own
replica's layers and serves CaS passes for the others; and an owner's outgoing link, which the WaS
copies running from it at once share."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class Clock:
    """Events in time order; at one instant, in the order they were set."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable, tuple]] = []
        self._order = itertools.count()

    def at(self, when: float, action: Callable, *args) -> None:
        heapq.heappush(self._events, (when, next(self._order), action, args))

    def run(self) -> None:
        while self._events:
            self.now, _, action, args = heapq.heappop(self._events)
            action(*args)


class Gpu:
    """One replica's GPU. CaS passes go first, as a service stream of higher priority would: a pass starts
    as soon as the previous one is done, and the replica's own work pauses for it and resumes after, so
    serving delays the owner's own step by exactly the time served. A pass serves every request then
    waiting for its layer (layers in the order first asked for): one read of the layer's pooled weights
    for all their rows, `pass_s(rows)`."""

    def __init__(self, clock: Clock, pass_s: Callable[[int], float]):
        self.clock, self.pass_s = clock, pass_s
        self.waiting: dict[int, list[tuple[int, Callable[[], None]]]] = {}
        self.serving = False
        self.own: list | None = None  # [seconds left, then, started or None while paused]
        self._version = 0  # only the own work's latest finish event is live
        self.serving_s = 0.0
        self.passes = 0
        self.requests = 0

    def serve(self, layer: int, rows: int, answer: Callable[[], None]) -> None:
        """A CaS request for `layer`'s pooled part on `rows` rows; `answer()` when its pass is done."""
        self.waiting.setdefault(layer, []).append((rows, answer))
        if not self.serving:
            self._pause_own()
            self._next_pass()

    def work(self, seconds: float, then: Callable[[], None]) -> None:
        """The replica's own next piece of work; it has one at a time."""
        assert self.own is None, "a replica's own work runs in order"
        self.own = [seconds, then, None]
        if not self.serving:
            self._resume_own()

    def _next_pass(self) -> None:
        layer = next(iter(self.waiting))
        requests = self.waiting.pop(layer)
        seconds = self.pass_s(sum(rows for rows, _ in requests))
        self.serving = True
        self.serving_s += seconds
        self.passes += 1
        self.requests += len(requests)
        self.clock.at(self.clock.now + seconds, self._served, [answer for _, answer in requests])

    def _served(self, answers: list[Callable[[], None]]) -> None:
        self.serving = False
        for answer in answers:
            answer()
        if self.waiting:
            self._next_pass()
        else:
            self._resume_own()

    def _pause_own(self) -> None:
        if self.own is not None and self.own[2] is not None:
            self.own[0] -= self.clock.now - self.own[2]
            self.own[2] = None
            self._version += 1

    def _resume_own(self) -> None:
        if self.own is not None and self.own[2] is None:
            self.own[2] = self.clock.now
            self._version += 1
            self.clock.at(self.clock.now + self.own[0], self._worked, self._version)

    def _worked(self, version: int) -> None:
        if version != self._version:
            return
        _, then, _ = self.own
        self.own = None
        then()


class Link:
    """One owner's outgoing link: the copies running on it at once each get an equal share of it."""

    def __init__(self, clock: Clock, bandwidth: float):
        self.clock, self.bandwidth = clock, bandwidth
        self.copies: dict[int, list] = {}  # [bytes left, then]
        self._ids = itertools.count()
        self._since = 0.0
        self._version = 0  # only the latest finish event set is live

    def copy(self, bytes_: float, then: Callable[[], None]) -> None:
        self._settle()
        self.copies[next(self._ids)] = [bytes_, then]
        self._schedule()

    def _settle(self) -> None:
        """Count down what each copy has moved since the last change."""
        if self.copies:
            moved = (self.clock.now - self._since) * self.bandwidth / len(self.copies)
            for copy in self.copies.values():
                copy[0] -= moved
        self._since = self.clock.now

    def _schedule(self) -> None:
        self._version += 1
        if self.copies:
            left = max(0.0, min(bytes_ for bytes_, _ in self.copies.values()))
            seconds = left * len(self.copies) / self.bandwidth
            self.clock.at(self.clock.now + seconds, self._finish, self._version)

    def _finish(self, version: int) -> None:
        if version != self._version:
            return
        self._settle()
        first = min(self.copies, key=lambda key: self.copies[key][0])
        _, then = self.copies.pop(first)
        self._schedule()
        then()
