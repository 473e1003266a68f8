"""Output locations checked before any work: a run that cannot write its results fails at start-up,
not after minutes of k-means or training.

The check tries what the run will do: it creates (and removes) a probe file in the deepest folder
that exists. Permission bits alone would mislead, since root ignores them while a read-only file
system stops root too.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


class NotWritable(ValueError):
    """An output location the run could not write; the message names the path, the cause and the fix."""


def check_writable(path, what: str, fix: str, folder: bool = True) -> Path:
    """Raise NotWritable unless ``path`` (a folder, or a file when ``folder=False``) can be created or
    written. ``what`` names the location ('--out'), ``fix`` says what to do ('choose another --out')."""
    path = Path(path)
    if path.exists() and folder != path.is_dir():
        kind = "a file" if folder else "a folder"
        raise NotWritable(f"{what} {path} is {kind}, not a {'folder' if folder else 'file'}: {fix}")
    if path.is_file() and not os.access(path, os.W_OK):
        raise NotWritable(f"{what} {path} is read-only: {fix}")
    base = path if path.is_dir() else _existing_parent(path, what, fix)
    _probe(base, path, what, fix)
    return path


def _existing_parent(path: Path, what: str, fix: str) -> Path:
    """The deepest existing ancestor; it must be a folder for ``path`` to be creatable."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotWritable(f"{what} {path} cannot be created: {parent} is a file, not a folder; {fix}")
    return parent


def _probe(folder: Path, path: Path, what: str, fix: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".sgengine-write-test-"):
            pass
    except OSError as err:
        raise NotWritable(f"{what} {path} is not writable ({err.strerror} in {folder}): {fix}") from None
