"""Rewrite a file so that only a content check (or ctime/inode) can tell: same size, mtime restored."""

from __future__ import annotations

import os
import time
from pathlib import Path


def rewrite_keeping_size_and_mtime(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` (same length) to ``path`` in place or by rename, then restore the old mtime."""
    before = path.stat()
    assert len(data) == before.st_size
    time.sleep(0.05)  # past the coarse clock tick of the file's last change
    if replace:
        tmp = path.with_name(".tmp-" + path.name)
        tmp.write_bytes(data)
        tmp.replace(path)
    else:
        with open(path, "r+b") as f:
            f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
