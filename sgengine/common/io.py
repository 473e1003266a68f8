"""General file helpers: writes that readers never see half-done, and a full disk named as such.

Every write of a run's outputs (checkpoints, metrics.jsonl, PNGs, annotation files) goes through
``atomic_write``, ``append_line`` or, for writers that take a path themselves (torch.save,
safetensors, DeepSpeed), ``naming_a_full_disk``: a write that fails for want of space raises
``DiskFull``, one line naming the folder, its mount and the space left, instead of the writer's own
words (torch's is ``[enforce fail at inline_container.cc:672] . unexpected pos``).
"""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
# torch's zip writer and DeepSpeed's shards lose the errno; a write that failed on a file system
# with less than this free is taken as a full disk too.
NEARLY_FULL = 1 << 20


class DiskFull(OSError):
    """A write failed because its file system is full; the message names the folder and the mount."""


def atomic_write(path, write) -> Path:
    """Write ``path`` through ``write(tmp)`` on a sibling temporary file, then one rename: readers
    and resumed runs see the old file or the whole new one, never half of it. A failed write leaves
    the old file and no temporary one (a full disk gets its space back)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with naming_a_full_disk(path):
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):  # never hide the write's own error
                tmp.unlink()
            raise
    return path


def append_line(path, line: str) -> None:
    """Append one line to a text file (metrics.jsonl, eval.jsonl); a failed append is cut back, so
    the file never ends in half a record."""
    path = Path(path)
    with naming_a_full_disk(path), open(path, "a") as fh:
        size = fh.tell()
        try:
            fh.write(line.rstrip("\n") + "\n")
            fh.flush()
        except BaseException:
            fh.truncate(size)
            raise


@contextmanager
def naming_a_full_disk(path):
    """Turn a failure of the writes inside into DiskFull when its cause is a full file system under
    ``path``; any other error passes unchanged."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as err:  # noqa: BLE001 - writers raise their own types (safetensors' SafetensorError)
        if is_disk_full(err, path, check_space=isinstance(err, RuntimeError)):
            raise DiskFull(describe_full_disk(path)) from err
        raise


def is_disk_full(err: BaseException, path, check_space: bool = True) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain or its words; else (``check_space``, for the
    writers that drop the errno) a file system left with less than NEARLY_FULL bytes."""
    seen, depth = err, 0
    while seen is not None and depth < 16:
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return True
        if any(word in str(seen).lower() for word in FULL_WORDS):
            return True
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    return check_space and free_bytes(path) < NEARLY_FULL


def free_bytes(path) -> int:
    """Bytes this process may still write on the file system of ``path`` (root may use the reserve)."""
    if not hasattr(os, "statvfs"):
        return shutil.disk_usage(existing_folder(path)).free
    st = os.statvfs(existing_folder(path))
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def describe_full_disk(path) -> str:
    folder = existing_folder(path)
    mount, device = mount_of(folder)
    free = shutil.disk_usage(folder).free
    return f"the disk is full: no space left for {path} on {mount} ({device}, {free / 2**20:.1f} MiB free)"


def existing_folder(path) -> Path:
    """``path`` itself when it is a folder, else its deepest existing ancestor folder."""
    folder = Path(os.path.abspath(path))
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


def mount_of(folder: Path) -> tuple[str, str]:
    """(mount point, device) of the file system that holds ``folder``."""
    mount = Path(os.path.realpath(folder))
    while not os.path.ismount(mount):
        mount = mount.parent
    device = "unknown device"
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == str(mount):
                device = fields[0]  # the last entry for a mount point is the one in use
    except OSError:
        pass
    return str(mount), device
