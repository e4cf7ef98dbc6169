"""The transport: how pooled tensors and CaS activations cross between replicas on one kind of device.

Four verbs, nothing else: `export` makes a tensor other replicas can open (it is then sent once, by
handle, through the group's start-up exchange); `open` turns a received handle into a view of the
peer's memory; `copy_into` fills a local slot from a peer view; `channel` makes the light signal that
carries a CaS request's header one way and its completion back. `maps_peers` says whether a peer view
can be computed on at local speed (on CPU it can; over NVLink only at link speed). The model and the
engine never see it. `CpuTransport` is the only one today; a CUDA one would export through torch's
CUDA IPC handles, copy on a side stream ordered by events, and keep the same pipe for headers.
"""

from __future__ import annotations

import multiprocessing.connection as mpc

import torch


class CpuTransport:
    """POSIX shared memory: torch sends a shared tensor as a file descriptor, so the segment has no
    name in /dev/shm and dies with its last holder, whatever the way the processes end."""

    maps_peers = True  # a peer view is ordinary memory here: computing on it costs what local does

    def export(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.share_memory_()

    def open(self, handle: torch.Tensor) -> torch.Tensor:
        return handle  # the unpickled tensor already maps the owner's pages

    def copy_into(self, slot: torch.Tensor, view: torch.Tensor) -> None:
        slot.copy_(view)

    @staticmethod
    def channel(ctx) -> tuple[mpc.Connection, mpc.Connection]:
        """A (requester end, owner end) pair: a socket pair carrying a few bytes each way."""
        return ctx.Pipe()


def transport_for(device: torch.device | str = "cpu") -> CpuTransport:
    if torch.device(device).type != "cpu":
        raise NotImplementedError(f"sidp has no transport for {device} yet; the CPU one is CpuTransport.")
    return CpuTransport()
