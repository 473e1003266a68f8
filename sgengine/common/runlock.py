"""One run per output folder: ``--out/run.lock``.

The lock is an OS lock (``fcntl.flock``) on ``run.lock``, held open while the run lives, plus the
holder written into the file (pid, host, start time, command) so that a refusal can name it. The
kernel drops the lock when its process ends however it ends, so a crash never leaves a lock that
blocks: a ``run.lock`` whose lock is free is stale, and the next run takes it over with a note. Only
a lock written on another host is refused even when free, since its pid cannot be checked from here
and not every network file system shares flock between hosts.

Locks are counted per process: the train CLI takes the lock before the self-labels and the trainer
takes it again, and the file is removed when the last holder in the process lets go.
"""
from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the written holder alone decides (see _lock)
    fcntl = None

LOCK_FILE = "run.lock"
_HELD: dict[str, list] = {}  # realpath of the lock file -> [open file object, holders in this process]


class RunLocked(OSError):
    """Another live run writes into this folder; the message names it and the fix."""


def acquire(out, log=print) -> Path:
    """Take (or take again, in this process) the lock of ``out``; raises RunLocked when another run
    holds it. ``log`` gets the note of a stale lock taken over."""
    path = Path(out) / LOCK_FILE
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):  # another process may remove the file between our open and our lock: retry
        fh = open(path, "a+")
        if not _lock(fh):
            holder = _read(fh)
            fh.close()
            raise RunLocked(f"--out {out} is in use by {describe(holder)}: wait for that run to end or stop it, "
                            "or choose another --out")
        if _same_file(fh, path):
            break
        fh.close()
    else:
        raise RunLocked(f"could not lock {path}: other processes keep replacing it")
    _take(fh, path, log)
    _HELD[key] = [fh, 1]
    return path


def release(out) -> None:
    """Let go once; the last holder in the process removes the file and drops the lock."""
    path = Path(out) / LOCK_FILE
    key = os.path.realpath(path)
    if key not in _HELD:
        return
    _HELD[key][1] -= 1
    if _HELD[key][1] > 0:
        return
    fh, _ = _HELD.pop(key)
    path.unlink(missing_ok=True)  # while still locked: a waiting opener then sees another file and retries
    fh.close()


def _release_all() -> None:
    for key in list(_HELD):
        _HELD[key][1] = 1
        release(Path(key).parent)


atexit.register(_release_all)


def _lock(fh) -> bool:
    """True when this process now holds the OS lock; without flock support (some network file
    systems), only the written holder can tell, so a live holder on this host still refuses."""
    try:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    holder = _read(fh)
    return not (holder and holder.get("host") == socket.gethostname() and _alive(holder.get("pid")))


def _same_file(fh, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
    except FileNotFoundError:
        return False


def _take(fh, path: Path, log) -> None:
    """Write this process as the holder; a holder left in the file is a stale lock (its process
    ended without letting go): taken over with a note, or refused when written on another host."""
    stale, host = _read(fh), socket.gethostname()
    if stale and stale.get("host") != host:
        fh.close()
        raise RunLocked(f"{path} names {describe(stale)}, a process that cannot be checked from {host}: "
                        f"if that run has ended, delete {path} and start again")
    if stale:
        state = "no longer running" if not _alive(stale.get("pid")) else "running but no longer holding it"
        log(f"note: took over the stale run lock {path} of {describe(stale)}, which is {state}")
    me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
          "command": command_line()}
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(me) + "\n")
    fh.flush()


def command_line() -> str:
    """How this process was started, as a user would type it (``python -m sgengine.train ...``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return " ".join(head + sys.argv[1:])


def _read(fh) -> dict | None:
    fh.seek(0)
    try:
        holder = json.loads(fh.read() or "null")
    except ValueError:
        return {"pid": None, "host": socket.gethostname()}  # cut short: the writer died mid-write
    return holder if isinstance(holder, dict) else None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def describe(holder: dict | None) -> str:
    if not holder:
        return "a run that is still starting"
    return (f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')})")
