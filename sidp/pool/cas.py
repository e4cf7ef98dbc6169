"""CaS (compute-as-a-service): a replica sends a layer's input rows to the layer's owner, which runs
the pooled op on its own weights and sends the output back.

Each (requester, owner) pair has one preallocated shared buffer and one socket pair. The requester
writes up to CAS_ROWS rows into the buffer and sends a 12-byte header (layer, op, rows); the owner's
service thread runs the op, writes the result over the same buffer and answers with one byte.
Tensors are never pickled. Requests for the same (layer, op) that are waiting when the service
wakes are fused into one matmul. The service is a thread of the owner's process, so the owner's own
steps and the service it gives run side by side (torch releases the GIL inside its kernels).
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection as mpc
import struct
import sys
import threading
import time
from collections import defaultdict

import torch

from sidp.model.decoder import Weights, project
from sidp.model.linear import compute_dtype, scratch_bytes
from sidp.model.spec import ModelSpec

CAS_ROWS = 256  # rows per round trip; larger requests go through the buffer in chunks
# A woken service thread needs the GIL, which the owner's own step loop holds between torch calls for
# up to the interpreter's switch interval (5 ms by default): far longer than the round trip itself.
SWITCH_INTERVAL_S = 1e-4
# A last resort only: an owner that dies or whose service thread stops closes the channel at once.
ANSWER_S = 60.0
OPS = ("qkv", "o", "mlp", "ping")
HEADER = struct.Struct("<iii")  # layer, op index, rows
OK = b"\x01"


def op_widths(spec: ModelSpec) -> tuple[dict[str, int], dict[str, int]]:
    """(input width, output width) of each op."""
    qkv = spec.q_size + 2 * spec.kv_size
    h = spec.hidden_size
    return {"qkv": h, "o": spec.q_size, "mlp": h, "ping": 0}, {"qkv": qkv, "o": h, "mlp": h, "ping": 0}


def buffer_width(spec: ModelSpec) -> int:
    inputs, outputs = op_widths(spec)
    return max(*inputs.values(), *outputs.values())


def new_buffer(spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(CAS_ROWS, buffer_width(spec), dtype=compute_dtype(dtype))


def cas_buffer_bytes(spec: ModelSpec, dtype: torch.dtype, peers: int, device: str = "cpu") -> int:
    """A replica's CaS memory: one buffer per owner it calls, and its service's workspace for the
    fused requests of its `peers` requesters (inputs, MLP activations, outputs, matmul scratch)."""
    if not peers:
        return 0
    itemsize = compute_dtype(dtype, device).itemsize
    width = buffer_width(spec)
    buffers = peers * CAS_ROWS * width * itemsize
    service_rows = peers * CAS_ROWS * (2 * width + 3 * spec.intermediate_size) * itemsize
    return buffers + service_rows + scratch_bytes(dtype, device)


class CasServer:
    """The owner's side: a thread serving requests from every requester's channel until all close."""

    def __init__(self, spec: ModelSpec, pieces: dict[int, Weights], channels: list[tuple]):
        self.pieces = pieces  # owned layer -> its pooled weights
        self.in_width, _ = op_widths(spec)
        self.buffers = dict(channels)  # owner end of each requester's channel -> that pair's buffer
        self.served = 0
        self.fused = 0  # requests that shared a matmul with another
        self.error: BaseException | None = None
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._serve, name="sidp-cas-service", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        open_conns = list(self.buffers)
        try:
            with torch.inference_mode():
                while open_conns:
                    open_conns = self._serve_ready(open_conns)
        except BaseException as error:  # the owner's check() raises it; requesters see their pipes close
            self.error = error
        finally:
            for conn in self.buffers:
                conn.close()

    def _serve_ready(self, open_conns: list) -> list:
        """Serve the requests waiting now; return the channels still open."""
        waiting = defaultdict(list)
        try:
            ready = mpc.wait(open_conns)
        except (OSError, ValueError):  # a channel was closed in this process
            return [conn for conn in open_conns if not conn.closed]
        for conn in ready:
            try:
                layer, op, rows = HEADER.unpack(conn.recv_bytes())
            except (EOFError, OSError):  # the requester has gone
                open_conns.remove(conn)
                continue
            waiting[layer, OPS[op]].append((conn, rows))
        for (layer, op), requests in waiting.items():
            self._run(layer, op, requests)
        return open_conns

    def check(self) -> None:
        """Raise what stopped the service thread, if it stopped on an error."""
        if self.error is not None:
            raise RuntimeError(f"this replica's CaS service stopped: {self.error!r}") from self.error

    def _run(self, layer: int, op: str, requests: list[tuple]) -> None:
        reply = OK
        try:
            if op != "ping":
                width = self.in_width[op]
                inputs = [self.buffers[conn][:rows, :width] for conn, rows in requests]
                out = project(op, inputs[0] if len(inputs) == 1 else torch.cat(inputs), self.pieces[layer])
                for (conn, rows), part in zip(requests, out.split([r for _, r in requests]), strict=True):
                    self.buffers[conn][:rows, : out.shape[1]].copy_(part)
        except Exception as error:  # the requester raises it; the service goes on for the others
            reply = f"owner failed on layer {layer} {op}: {error!r}".encode()
        self.served += len(requests)
        self.fused += len(requests) if len(requests) > 1 else 0
        for conn, _ in requests:
            with contextlib.suppress(OSError):  # that requester died; its channel closes on the next wait
                conn.send_bytes(reply)


class CasClient:
    """The requester's side: run a pooled op of a remote layer on its owner."""

    def __init__(self, spec: ModelSpec, owners: tuple[int, ...], channels: dict[int, tuple]):
        self.owners = owners  # layer -> owning rank
        self.channels = channels  # owner rank -> (requester end, buffer)
        self.in_width, self.out_width = op_widths(spec)
        self.sent = 0
        self.wait_s = 0.0

    def __call__(self, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        conn, buffer = self.channels[self.owners[layer]]
        started = time.perf_counter()
        out = torch.empty(x.shape[0], self.out_width[op], dtype=x.dtype)
        for start in range(0, x.shape[0], CAS_ROWS):
            rows = min(CAS_ROWS, x.shape[0] - start)
            buffer[:rows, : x.shape[1]].copy_(x[start : start + rows])
            self._round_trip(conn, layer, op, rows, self.owners[layer])
            out[start : start + rows].copy_(buffer[:rows, : out.shape[1]])
        self.wait_s += time.perf_counter() - started
        return out

    def ping(self, owner: int) -> float:
        """Seconds for one empty round trip to `owner`'s service."""
        started = time.perf_counter()
        self._round_trip(self.channels[owner][0], 0, "ping", 0, owner)
        return time.perf_counter() - started

    def _round_trip(self, conn, layer: int, op: str, rows: int, owner: int) -> None:
        try:
            conn.send_bytes(HEADER.pack(layer, OPS.index(op), rows))
            if not conn.poll(ANSWER_S):
                raise RuntimeError(f"replica {owner} has not answered a CaS request in {ANSWER_S:.0f} s")
            reply = conn.recv_bytes()
        except (EOFError, OSError):
            raise RuntimeError(f"the CaS service of replica {owner} (layer {layer}) has gone") from None
        self.sent += 1
        if reply != OK:
            raise RuntimeError(reply.decode(errors="replace"))
