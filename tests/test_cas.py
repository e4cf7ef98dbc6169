"""CaS in one process: the service answers through the shared buffer, fuses what waits together, chunks
what is larger than the buffer, and reports an owner's failure or absence as an error, not a hang."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import torch
from conftest import COMMON

from sidp.model.decoder import project
from sidp.model.spec import ModelSpec
from sidp.pool.cas import CAS_ROWS, CasClient, CasServer, new_buffer
from sidp.pool.policy import Calibration, ModePolicy

SPEC = ModelSpec.from_hf_config({**COMMON, "model_type": "qwen2"})  # the tiny Qwen2 of the fixtures


def piece() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, q, kv, f = SPEC.hidden_size, SPEC.q_size, SPEC.kv_size, SPEC.intermediate_size
    shapes = {
        "qkv": (q + 2 * kv, h),
        "qkv_bias": (q + 2 * kv,),
        "o_proj": (h, q),
        "gate_up": (2 * f, h),
        "down": (h, f),
    }
    return {name: torch.randn(shape, generator=g) * 0.1 for name, shape in shapes.items()}


def pair(requesters: int):
    """`requesters` clients of one owner (rank 0) that owns layer 1, and the owner's channel ends."""
    clients, served = [], []
    for _ in range(requesters):
        mine, owners_end = multiprocessing.Pipe()
        buffer = new_buffer(SPEC, torch.float32)
        clients.append(CasClient(SPEC, (0, 0), {0: (mine, buffer)}))
        served.append((owners_end, buffer))
    return clients, served


@pytest.mark.parametrize("op", ["qkv", "o", "mlp"])
def test_requests_waiting_together_share_one_matmul(op):
    weights = piece()
    clients, served = pair(2)
    width = SPEC.q_size if op == "o" else SPEC.hidden_size
    inputs = [torch.randn(3, width), torch.randn(5, width)]
    outputs = [None, None]

    def call(k: int) -> None:
        outputs[k] = clients[k](1, op, inputs[k])

    threads = [threading.Thread(target=call, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # both requests are written and signalled before the service starts
    server = CasServer(SPEC, {1: weights}, served)
    for t in threads:
        t.join(10)
    for x, y in zip(inputs, outputs, strict=True):
        torch.testing.assert_close(y, project(op, x, weights))
    assert (server.served, server.fused) == (2, 2)
    assert [c.sent for c in clients] == [1, 1]


def test_a_request_larger_than_the_buffer_goes_in_chunks():
    weights = piece()
    (client,), served = pair(1)
    server = CasServer(SPEC, {1: weights}, served)
    x = torch.randn(CAS_ROWS + 44, SPEC.hidden_size)
    torch.testing.assert_close(client(1, "mlp", x), project("mlp", x, weights))
    assert client.sent == 2 and server.served == 2 and server.fused == 0
    assert client.ping(0) > 0


def test_owner_failure_and_absence_raise_in_the_requester():
    (client,), served = pair(1)
    CasServer(SPEC, {1: piece()}, served)
    with pytest.raises(RuntimeError, match="owner failed on layer 0 mlp"):  # layer 0 is not owned there
        client(0, "mlp", torch.randn(2, SPEC.hidden_size))
    served[0][0].close()  # the owner goes away
    with pytest.raises(RuntimeError, match=r"CaS service of replica 0 \(layer 1\) has gone"):
        client(1, "mlp", torch.randn(2, SPEC.hidden_size))


def test_a_service_thread_that_dies_is_an_error_for_requester_and_owner_not_a_hang():
    (client, other), served = pair(2)
    server = CasServer(SPEC, {1: piece()}, served)
    client.channels[0][0].send_bytes(b"bad")  # the service thread dies on it
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"CaS service of replica 0 \(layer 1\) has gone"):
        other(1, "mlp", torch.randn(2, SPEC.hidden_size))
    assert time.monotonic() - started < 5
    with pytest.raises(RuntimeError, match=r"CaS service stopped: error\("):
        server.check()


def test_policy_picks_cas_for_few_rows_and_was_for_many_and_learns_queueing():
    # Copying a layer takes 1 ms, a round trip 0.1 ms, compute 10 us per row.
    calibration = Calibration(1e-3, 1e-4, tuple((r, r * 1e-5) for r in (1, 8, 64, 512)))
    policy = ModePolicy(calibration, remote_layers=15, ops_per_layer=1)
    assert calibration.compute_s(32) == pytest.approx(32e-5)
    assert calibration.compute_s(1024) == pytest.approx(1024e-5)  # linear past the grid
    assert policy.choose(1) == "cas" and policy.choose(64) == "cas"
    assert policy.choose(256) == "was"  # compute (2.56 ms) hides the copy; CaS adds its round trips
    for _ in range(30):  # owners turn out busy: each request waits 1 ms more than its compute
        policy.observe_cas(8, 15 * (8e-5 + 1e-3))
    assert policy.request_overhead_s == pytest.approx(1e-3, rel=0.01)
    assert policy.choose(8) == "was"
    single_slot = ModePolicy(calibration, remote_layers=15, ops_per_layer=1, slots=1)
    assert single_slot.choose(256) == "cas"  # nothing hides the copy any more
