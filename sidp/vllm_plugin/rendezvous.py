"""The start-up meeting of a group's ranks: each hands every other rank its owned tensors, by descriptor.

Each rank listens on a Unix socket in Linux's abstract namespace, named from the group and the rank: such
a socket has no file, in /tmp or anywhere, and disappears when its process closes it or dies, so nothing
is ever left to clean up. A rank connects to each peer's socket (retrying while the peer is still
loading) and is sent the peer's message through sidp.pool.handoff, the tensors as memfd descriptors the
kernel passes along; meanwhile a thread serves its own message to each peer that connects. The exchange
ends once a rank has fetched from all its peers and served them all; only processes of the same user
are served or believed. The memory itself belongs to no socket: a mapped segment lives while anyone maps it.
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing.connection as mpc
import os
import socket
import struct
import threading
import time

from sidp.errors import SidpError
from sidp.pool import handoff

POLL_S = 0.2


def address(group: str, rank: int) -> str:
    """The abstract socket name (a leading NUL) of `rank` in `group`; hashed, so any group name fits."""
    return f"\0sidp-vllm-{hashlib.sha256(group.encode()).hexdigest()[:32]}-{rank}"


def exchange(group: str, rank: int, size: int, message: object, timeout_s: float) -> dict[int, object]:
    """Every other rank's `message` (its tensors mapped here), once this rank's has reached them all."""
    if size == 1:
        return {}
    deadline = time.monotonic() + timeout_s
    listener = _listen(group, rank, size)
    server = _Server(listener, rank, size, message, deadline)
    server.start()
    try:
        peers = [(rank + step) % size for step in range(1, size)]  # each rank starts at a different peer
        got = {peer: _fetch(group, rank, peer, deadline, timeout_s) for peer in peers}
        server.join(max(0.0, deadline - time.monotonic()))
        server.check(timeout_s, group)
        return got
    finally:
        server.stop()
        listener.close()


def _listen(group: str, rank: int, size: int) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address(group, rank))
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise SidpError(
                f"Rank {rank} of SiDP group {group!r} is already running: give each rank its own rank and "
                "each run its own group name."
            ) from None
        raise
    listener.listen(size)
    listener.settimeout(POLL_S)
    return listener


def _fetch(group: str, rank: int, peer: int, deadline: float, timeout_s: float) -> object:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address(group, peer))
            break
        except (ConnectionRefusedError, FileNotFoundError):  # not listening yet: still loading
            sock.close()
        if time.monotonic() > deadline:
            raise SidpError(
                f"Rank {peer} of SiDP group {group!r} did not answer within {timeout_s:g} s. Start all ranks "
                "with the same group name and size, one rank each (or raise SIDP_VLLM_TIMEOUT)."
            )
        time.sleep(POLL_S)
    _check_same_user(sock)
    with mpc.Connection(sock.detach()) as conn:
        conn.send_bytes(rank.to_bytes(4, "little"))
        message = handoff.receive(conn)
        conn.send_bytes(b"ok")  # the descriptors are ours now: the peer may close
    return message


class _Server(threading.Thread):
    """Sends `message` to each peer that connects, until every peer has had it or the deadline passes."""

    def __init__(self, listener: socket.socket, rank: int, size: int, message: object, deadline: float):
        super().__init__(name=f"sidp-rendezvous-{rank}", daemon=True)
        self.listener, self.rank, self.size = listener, rank, size
        self.message, self.deadline = message, deadline
        self.served: set[int] = set()
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while len(self.served) < self.size - 1 and not self.stopping.is_set():
                if time.monotonic() > self.deadline:
                    return
                try:
                    sock, _ = self.listener.accept()
                except TimeoutError:
                    continue
                self._serve(sock)
        except BaseException as error:  # raised again in the main thread, by check()
            self.error = error

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(None)
        try:
            _check_same_user(sock)
        except SidpError:
            sock.close()
            return
        with mpc.Connection(sock.detach()) as conn:
            peer = int.from_bytes(conn.recv_bytes(), "little")
            handoff.send(conn, self.message)
            conn.recv_bytes()  # the peer has the descriptors
        self.served.add(peer)

    def stop(self) -> None:
        self.stopping.set()
        self.join()

    def check(self, timeout_s: float, group: str) -> None:
        if self.error is not None:
            raise SidpError(
                f"Serving this rank's weights to its peers failed: {self.error!r}"
            ) from self.error
        missing = sorted(set(range(self.size)) - self.served - {self.rank})
        if missing:
            raise SidpError(
                f"Ranks {missing} of SiDP group {group!r} did not fetch this rank's weights within "
                f"{timeout_s:g} s; did one of them stop?"
            )


def _check_same_user(sock: socket.socket) -> None:
    """Only a process of this user may hand us memory or be handed ours."""
    _, uid, _ = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    )
    if uid != os.getuid():
        sock.close()
        raise SidpError(f"A process of user {uid} connected to this SiDP group's socket; it was refused.")
