"""Sending shared CPU tensors through a pipe as file descriptors (SCM_RIGHTS), with nothing else involved.

torch's own pickling of a shared tensor hands its descriptor over through a helper thread listening on
a socket under /tmp/pymp-*, which a killed process leaves behind. Here the descriptors ride the same
socket pair as the message: the kernel moves them, and owns them if either side dies. A relay (the
driver) passes the descriptors on without mapping the memory: what it receives it forwards as is.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
from dataclasses import dataclass
from multiprocessing.reduction import recvfds, sendfds

import torch

FDS_PER_MESSAGE = 250  # the kernel takes at most 253 in one message


@dataclass(frozen=True, slots=True)
class SharedHandle:
    """A tensor in shared memory: its storage's descriptor (valid in the holding process) and layout."""

    fd: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def open(self) -> torch.Tensor:
        storage = torch.UntypedStorage._new_shared_fd_cpu(self.fd, self.nbytes)  # maps a dup of fd
        return torch.empty(0, dtype=self.dtype).set_(storage, self.offset, self.shape, self.stride)


def send(conn, message) -> None:
    """Send `message`; every tensor in it (already in shared memory) and every SharedHandle goes by
    descriptor."""
    data, fds = io.BytesIO(), []
    _Pickler(data, fds).dump(message)
    conn.send_bytes(len(fds).to_bytes(4, "little") + data.getvalue())  # the count of what follows
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        for start in range(0, len(fds), FDS_PER_MESSAGE):
            sendfds(sock, fds[start : start + FDS_PER_MESSAGE])


def receive(conn):
    """The next message sent by `send`, its tensors opened as views of the sender's memory."""
    message, fds = _receive(conn, open_tensors=True)
    close(fds)
    return message


def receive_handles(conn) -> tuple[object, list[int]]:
    """For a relay: the next message with its tensors left as SharedHandles, to `send` on as they are,
    and the descriptors it holds, to `close` once sent."""
    return _receive(conn, open_tensors=False)


def close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _receive(conn, open_tensors: bool) -> tuple[object, list[int]]:
    data = conn.recv_bytes()
    count = int.from_bytes(data[:4], "little")
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        fds: list[int] = []
        while len(fds) < count:
            fds += recvfds(sock, min(FDS_PER_MESSAGE, count - len(fds)))
    try:
        return _Unpickler(io.BytesIO(data[4:]), fds, open_tensors).load(), fds
    except BaseException:
        close(fds)
        raise


class _Pickler(pickle.Pickler):
    def __init__(self, file, fds: list[int]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.fds = fds

    def persistent_id(self, obj):
        if isinstance(obj, SharedHandle):
            self.fds.append(obj.fd)
            return (len(self.fds) - 1, obj.nbytes, obj.dtype, obj.shape, obj.stride, obj.offset)
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if not storage.is_shared():
                raise ValueError("only tensors in shared memory (share_memory_()) can be handed off")
            fd, nbytes = storage._share_fd_cpu_()
            self.fds.append(fd)
            layout = (obj.dtype, tuple(obj.shape), obj.stride(), obj.storage_offset())
            return (len(self.fds) - 1, nbytes, *layout)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, fds: list[int], open_tensors: bool):
        super().__init__(file)
        self.fds = fds
        self.open_tensors = open_tensors

    def persistent_load(self, pid):
        index, *layout = pid
        handle = SharedHandle(self.fds[index], *layout)
        return handle.open() if self.open_tensors else handle
