"""The fingerprint of the extension's sources. setup.py bakes it into cmfast._C; at import, cmfast compares it
with the sources beside the package to spot a stale build. Stdlib only: setup.py loads this file by path."""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_DIRS = ("csrc", "kernels")


def source_hash(root: Path) -> str | None:
    """Hash of every file in csrc/ and kernels/ under `root`, or None when there are none (an installed wheel)."""
    files = sorted(p for d in SOURCE_DIRS for p in (root / d).glob("*") if p.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
