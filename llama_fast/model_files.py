"""Paths of the files a model directory names: never outside the directory.

A checkpoint names files in data (a sharded index's weight_map) and holds files that may be symlinks. Both
are resolved here before anything is opened: a name must be relative, plain (no "..", no empty or "."
parts), and the file it resolves to (symlinks followed) must lie inside the model directory. One exception
keeps the Hugging Face cache working: in `<repo>/snapshots/<revision>/`, files are symlinks into
`<repo>/blobs/`, which is therefore allowed too. Errors name the path, never the file's contents.
"""
from __future__ import annotations

import os


class UnsafePathError(ValueError):
    """A file name that leaves the model directory."""


def _allowed_roots(directory: str) -> list[str]:
    real = os.path.realpath(directory)
    roots = [real]
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":   # huggingface_hub's cache layout
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def model_file(directory: str | os.PathLike, name, what: str = "file") -> str:
    """os.path.join(directory, name), checked to stay inside `directory` (see the module docstring)."""
    directory = os.fspath(directory)
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{directory}: {what} name must be a non-empty string, got {type(name).__name__}")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts) \
            or "\0" in name or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"{directory}: {what} {name!r} is not a plain relative name inside the model "
                              "directory (absolute paths and '..' are refused)")
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in _allowed_roots(directory)):
        raise UnsafePathError(f"{directory}: {what} {name!r} resolves outside the model directory (a symlink "
                              "out of it is refused)")
    return path
