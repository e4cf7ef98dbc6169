"""The planner's group model (sidp.plan.group, sidp.plan.events): fused CaS passes, an owner's own work
paused for the passes it serves, copies sharing an owner's link, and the per-replica model wherever
nothing is borrowed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sidp.bench.workload import Request
from sidp.plan import paper, report
from sidp.plan.capacity import Layout, capacity
from sidp.plan.events import Clock, Gpu, Link
from sidp.plan.group import segments, simulate_group
from sidp.plan.hardware import SMALL_BATCH_HALF_ROWS, gpu
from sidp.plan.models import model_spec
from sidp.plan.simulate import replica_step_times, simulate
from sidp.plan.step_time import StepTime

MLP = frozenset({"mlp"})


def test_a_fused_pass_reads_the_weights_once():
    _, spec = model_spec("qwen3-32b")
    device = gpu("H200")
    step = StepTime(spec, device, parts=MLP, remote_layers=56)
    weights = 3 * 5120 * 25600 * 2
    for rows in (8, 64, 512):
        assert step.pooled_s(7 * rows) == device.roofline_s(2 * 7 * rows * weights / 2, weights)
    assert step.pooled_s(7 * 8) == step.pooled_s(8)  # decode rows: one weight read serves all seven
    assert step.pooled_s(7 * 64) < 7 * step.pooled_s(64)
    assert step.pooled_s(7 * 512) == pytest.approx(7 * step.pooled_s(512))  # FLOP-bound: nothing saved


def test_requests_waiting_for_a_layer_share_one_pass():
    clock, answered = Clock(), {}
    owner = Gpu(clock, pass_s=lambda rows: rows / 100)
    for when, name, layer in ((0.0, "a", 1), (0.1, "b", 1), (0.2, "c", 2), (0.3, "d", 1)):
        clock.at(when, owner.serve, layer, 50, lambda name=name: answered.setdefault(name, clock.now))
    clock.run()
    # a alone (0 to 0.5); then b and d together, first asked for before c's layer (0.5 to 1.5); then c.
    assert answered == pytest.approx({"a": 0.5, "b": 1.5, "d": 1.5, "c": 2.0})
    assert (owner.passes, owner.requests) == (3, 4)
    assert owner.serving_s == pytest.approx(2.0)


def test_the_owners_own_work_waits_for_the_passes_it_serves():
    clock, done = Clock(), {}
    owner = Gpu(clock, pass_s=lambda rows: 0.5)
    clock.at(0.0, owner.work, 1.0, lambda: done.setdefault("own", clock.now))
    clock.at(0.25, owner.serve, 3, 8, lambda: done.setdefault("served", clock.now))
    clock.run()
    assert done == pytest.approx({"served": 0.75, "own": 1.5})


def test_copies_from_one_owner_share_its_link():
    clock, done = Clock(), {}
    link = Link(clock, bandwidth=100.0)
    link.copy(100.0, lambda: done.setdefault("alone", clock.now))
    clock.run()
    assert done["alone"] == pytest.approx(1.0)
    start = clock.now
    for name in ("first", "second"):
        link.copy(100.0, lambda name=name: done.setdefault(name, clock.now - start))
    clock.at(start + 0.5, link.copy, 25.0, lambda: done.setdefault("late", clock.now - start))
    clock.run()
    # Two at half speed for 0.5 s (25 bytes each); then three at a third (25 more each by 1.25 s,
    # when the late one ends); then the first two finish their last 50 at half speed: 2.25 s.
    assert done["late"] == pytest.approx(1.25)
    assert done["first"] == pytest.approx(2.25) and done["second"] == pytest.approx(2.25)


def test_a_step_is_runs_of_own_work_each_ended_by_a_borrowed_layer():
    owners = (0, 1, 2, 0, 1, 2)
    assert segments(owners, 0) == [(2, 1, 1, 1), (1, 0, 2, 2), (2, 1, 1, 4), (1, 0, 2, 5), (0, 0, None, None)]
    assert segments((0,) * 4, 0) == [(4, 4, None, None)]


@pytest.mark.parametrize("layout", [Layout(2), Layout(1, parts=MLP)], ids=["dp2", "one-replica-pooled"])
def test_with_nothing_borrowed_the_group_is_the_per_replica_model(layout):
    _, spec = model_spec("qwen3-32b")
    device = gpu("H200")
    cap = capacity(spec, device, layout)
    requests = [Request([0] * 700, 40) for _ in range(24)]
    alone = simulate(spec, cap, replica_step_times(spec, device, cap), requests, 1024, 512)
    group = simulate_group(spec, cap, replica_step_times(spec, device, cap), requests, 1024, 512)
    assert group.steps == alone.steps > 24
    assert group.elapsed_by_replica == pytest.approx(alone.elapsed_by_replica, rel=1e-12)
    assert group.group["cas_passes"] == 0


def test_owners_pay_for_the_cas_they_serve():
    """Two replicas in CaS: one request per borrowed layer per step, none fused (a requester has one in
    flight per owner), and the owners' serving time makes the group slower than each replica alone."""
    _, spec = model_spec("qwen3-32b")
    device = gpu("H200")
    cap = capacity(spec, device, Layout(2, parts=MLP, mode="cas"))
    requests = [Request([0] * 700, 40) for _ in range(32)]
    alone = simulate(spec, cap, replica_step_times(spec, device, cap), requests, 1024, 512)
    step_times = replica_step_times(spec, device, cap)
    group = simulate_group(spec, cap, step_times, requests, 1024, 512)
    assert group.steps == alone.steps and group.modes == {"cas": group.steps}
    assert group.group["cas_passes"] == group.steps * 32 and group.group["requests_per_pass"] == 1.0
    assert 0 < group.group["serving_share"] < 1
    assert group.elapsed_s > alone.elapsed_s


def test_kernels_at_small_batch_are_slower_by_the_named_curve():
    device = replace(gpu("H200"), half_speed_rows=SMALL_BATCH_HALF_ROWS)
    roofline = gpu("H200").roofline_s(1e9, 1e9)
    assert device.roofline_s(1e9, 1e9, SMALL_BATCH_HALF_ROWS) == pytest.approx(2 * roofline)
    assert device.roofline_s(1e9, 1e9) == roofline  # no rows given: the roofline


def test_paper_entry_has_both_models_and_the_small_batch_line(monkeypatch):
    monkeypatch.setattr(report, "SHAPE_OUTPUT_LEN", 16)  # short requests: the entry's shape, quickly
    monkeypatch.setattr(paper, "HALF_SPEED_ROWS", (SMALL_BATCH_HALF_ROWS, 4 * SMALL_BATCH_HALF_ROWS))
    _, spec = model_spec("qwen3-32b")
    entry = paper._entry("Qwen3-32B", spec, gpu("H200", memory_gib=48), 4, 2, 1)  # few KV blocks to build
    assert (
        entry["capacity"]["sidp"]["kv_tokens_per_replica"] > entry["capacity"]["dp"]["kv_tokens_per_replica"]
    )
    for size in ("1K", "4K"):
        assert entry[size]["replica_vs_dp"] > 0 and entry[size]["group_vs_dp"] > 0
    assert entry["4K"]["group_fixed_policy_vs_dp"] > 0
    rows = [p["half_speed_rows"] for p in entry["4K_small_batch"]]
    assert rows == sorted(rows) and rows[0] == SMALL_BATCH_HALF_ROWS
    slowed = entry["4K_small_batch"][0]["dp"]["output_tokens_per_s"]
    assert slowed < entry["4K"]["dp"]["output_tokens_per_s"]
