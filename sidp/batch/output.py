"""A batch job's output file: written by one run at a time, read back to resume, appended to result by
result.

The run holds an exclusive lock on the file itself (flock), which the kernel drops when the process ends
however it ends: a second run on the same output is refused while the first lives, and nothing is left
on disk to clean up after a crash.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from sidp.batch.formats import line_id
from sidp.errors import SidpError


class OutputFile:
    def __init__(self, path: Path, fsync: bool = False):
        """fsync: make each result durable (on disk, not only in the page cache) before the next."""
        self.path = path
        self.fsync = fsync
        try:
            self.file = path.open("a+b")
        except OSError as error:
            raise SidpError(f"Cannot write --output {path}: {error.strerror}.") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise SidpError(
                f"Another sidp run is writing {path}; let it finish (or stop it) before starting this one."
            ) from None

    def finished_ids(self) -> set[str]:
        """Ids already answered in the file; a last line cut short (a killed run) is dropped from it."""
        self.file.seek(0)
        data = self.file.read()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            self.file.truncate(len(whole))
        # Split on newlines alone: str.splitlines would also break at U+2028 or U+0085 inside a text.
        lines = whole.decode("utf-8", errors="replace").split("\n")
        return {i for line in lines if (i := line_id(line))}

    def write(self, record: dict) -> None:
        self.file.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self.file.flush()
        if self.fsync:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
