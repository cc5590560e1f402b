"""The machine's lock for heavy work (``flock /tmp/loraq-heavy.lock``): benches hold it around their timed runs
so that tests, WebUIs and other benches wait, and their numbers are not another process's load."""
from __future__ import annotations

import fcntl

DEFAULT = "/tmp/loraq-heavy.lock"


class HeavyLock:
    """``with HeavyLock(path):`` holds the lock; a caller that holds it already passes another path."""

    def __init__(self, path: str = DEFAULT):
        self.path = path

    def __enter__(self) -> "HeavyLock":
        self.file = open(self.path, "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
