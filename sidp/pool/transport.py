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
import os

import torch


class CpuTransport:
    """Anonymous shared memory (memfd) passed by file descriptor (sidp.pool.handoff): a segment never
    has a name, in /dev/shm or anywhere, and dies with its last holder, however the processes end.
    (torch's share_memory_() names its segment for a moment, which a kill at that moment leaves behind.)"""

    maps_peers = True  # a peer view is ordinary memory here: computing on it costs what local does

    def export(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` in memory other replicas can map."""
        if not hasattr(os, "memfd_create") or tensor.nbytes == 0:  # not Linux: torch's way
            return tensor.share_memory_()
        fd = os.memfd_create("sidp-pool", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, tensor.nbytes)
            storage = torch.UntypedStorage._new_shared_fd_cpu(fd, tensor.nbytes)  # maps a dup of fd
        finally:
            os.close(fd)
        shared = torch.empty(0, dtype=tensor.dtype).set_(storage, 0, tensor.shape)
        return shared.copy_(tensor)

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
