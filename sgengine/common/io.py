"""General file helpers: writes that readers never see half-done."""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Write ``path`` through ``write(tmp)`` on a sibling temporary file, then one rename: readers
    and resumed runs see the old file or the whole new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path
