"""The ranks' start-up exchange: every rank maps every peer's tensors (the owner's memory, not a copy), a
missing peer or a second copy of a rank is a clear error, and nothing is left behind."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import uuid

import pytest
import torch

from sidp.errors import SidpError
from sidp.pool.transport import CpuTransport
from sidp.vllm_plugin import rendezvous

SIZE = 3


def _rank(group: str, rank: int, barrier, results) -> None:
    mine = CpuTransport().export(torch.full((4,), float(rank)))
    got = rendezvous.exchange(group, rank, SIZE, {"rank": rank, "t": mine}, timeout_s=60)
    barrier.wait()
    mine += 10  # after the exchange: a peer that maps this memory sees it, a copy would not
    barrier.wait()
    results.put((rank, {peer: (m["rank"], m["t"].tolist()) for peer, m in got.items()}))


def test_every_rank_maps_every_peers_tensors():
    group = f"test-{uuid.uuid4().hex}"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(SIZE), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(group, r, barrier, results)) for r in range(SIZE)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for rank in range(SIZE):
        peers = {p for p in range(SIZE) if p != rank}
        assert got[rank] == {p: (p, [p + 10.0] * 4) for p in peers}
    for rank in range(SIZE):  # the sockets went with their exchange: no file, no listener
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, pytest.raises(ConnectionRefusedError):
            s.connect(rendezvous.address(group, rank))
    assert not [name for name in os.listdir("/dev/shm") if "sidp" in name]


def test_a_missing_peer_is_named_after_the_timeout():
    with pytest.raises(SidpError, match=r"Rank 1 of SiDP group 'alone-\w+' did not answer within 0.5 s"):
        rendezvous.exchange(f"alone-{uuid.uuid4().hex[:6]}", 0, 2, {}, timeout_s=0.5)


def test_a_rank_started_twice_is_refused():
    group = f"twice-{uuid.uuid4().hex}"
    with (
        rendezvous._listen(group, 0, 2),
        pytest.raises(SidpError, match="Rank 0 of SiDP group .* is already running"),
    ):
        rendezvous.exchange(group, 0, 2, {}, timeout_s=5)


def test_a_group_of_one_meets_nobody():
    assert rendezvous.exchange("solo", 0, 1, {"t": torch.zeros(1)}, timeout_s=0.1) == {}
