"""One live run per checkpoint directory: a run holds an OS lock on `{checkpoint_dir}.lock` for its whole life,
so a second copy of the same command is refused before it moves or writes anything."""

from __future__ import annotations

import fcntl
import os
import pathlib
import socket
import time

import jax
import jax.experimental.multihost_utils
import numpy as np

from minimind_jax.errors import UserError

OWNER_BYTES = 256  # the owner's line, as every process of a multi-process run receives it from process 0


class RunLock:
    """An exclusive flock on `{directory}.lock`, beside the directory so that --overwrite moving the directory
    aside keeps it. The kernel drops it when its process dies, even by SIGKILL; the file names the owner (pid,
    host, start) for the message a second run gets. In a multi-process run process 0 holds it for all.

    Entering takes it where the lock file's folder exists already (a live run has one), so that a second run
    stops before any work, while a run stopped by a bad flag creates nothing. `take()` takes it in any case,
    once the run is about to write."""

    def __init__(self, directory: pathlib.Path, is_main: bool):
        self.directory = directory
        self.path = directory.with_name(f"{directory.name}.lock")
        self.is_main = is_main
        self._file = None

    def __enter__(self) -> RunLock:
        try:
            self._take(create=False)
        except BaseException:  # with no `with` block entered, nothing else would release it
            self.release()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def take(self) -> None:
        """Holds the lock from now on; one line naming the owner when another run holds it."""
        self._take(create=True)

    def release(self) -> None:
        """Removes the file before unlocking it: a run that opened it meanwhile then finds it gone and locks the
        new one (_lock), so two runs never hold two different files."""
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None

    def _take(self, create: bool) -> None:
        owner = ""
        if self.is_main and self._file is None and (create or self.path.parent.is_dir()):
            owner = self._lock()
        owner = _from_process_0(owner)
        if owner:
            raise UserError(
                f"{self.directory.resolve()} is in use by {owner}; wait for it or give another --checkpoint_dir"
            )

    def _lock(self) -> str:
        """Takes the lock and writes this process as its owner; the owner's line ("" when taken)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                file = open(self.path, "a+", encoding="utf-8")
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    file.seek(0)
                    owner = file.read().strip()
                    file.close()
                    return owner or "another run"  # it has the lock but has not written itself yet
                if _same_file(file, self.path):
                    break
                file.close()  # its owner removed it between our open and flock: lock the file now there
        except OSError as error:
            raise UserError(f"cannot lock {self.path.resolve()}: {error.strerror}") from None
        file.truncate(0)
        file.write(f"pid {os.getpid()} on host {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})")
        file.flush()
        self._file = file
        return ""


def _same_file(file, path: pathlib.Path) -> bool:
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _from_process_0(owner: str) -> str:
    """Process 0's `owner` on every process: all of a multi-process run stop together, with the same line."""
    if jax.process_count() == 1:
        return owner
    text = owner.encode()[:OWNER_BYTES]
    encoded = np.zeros(OWNER_BYTES, np.int32)
    encoded[: len(text)] = np.frombuffer(text, np.uint8)
    received = jax.experimental.multihost_utils.broadcast_one_to_all(encoded)
    return bytes(np.asarray(received).astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
