"""File manifests of checkpoint directories: what a complete checkpoint holds, checked before it is read.

An orbax checkpoint is many files (array chunks, metadata, commit markers). A deleted or truncated
chunk may not fail a restore: tensorstore reads a missing chunk as its fill value. So every
directory this project writes gets a manifest, the relative path and size of each of its files,
written once the directory is complete:

    write_manifest(directory, manifest_path)   # after the save has finished
    verify_manifest(directory, manifest_path)  # raises CheckpointError naming the first bad file

Inference checkpoints (`sam_jax.checkpoint.save_params`) keep it inside the directory as
`MANIFEST.json`; training checkpoints keep one per step beside the step directories. A directory
without a manifest (written by another tool) is read unchecked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sam_jax.convert.errors import CheckpointError

MANIFEST_FILE = "MANIFEST.json"
MAX_MANIFEST_BYTES = 16 << 20  # ~100k files' worth: a larger one is refused unread


def list_files(directory: str | os.PathLike) -> dict[str, int]:
    """{relative path: size in bytes} of every file under `directory` (the manifest itself excluded)."""
    root = Path(directory)
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel != MANIFEST_FILE:
                files[rel] = path.stat().st_size
    return dict(sorted(files.items()))


def write_manifest(directory: str | os.PathLike, manifest_path: str | os.PathLike | None = None) -> Path:
    """Write the manifest of a complete `directory` (default `directory/MANIFEST.json`), atomically."""
    from sam_jax.files import write_json

    path = Path(manifest_path) if manifest_path is not None else Path(directory) / MANIFEST_FILE
    write_json(path, {"files": list_files(directory)}, indent=1)
    return path


def has_manifest(directory: str | os.PathLike, manifest_path: str | os.PathLike | None = None) -> bool:
    return (Path(manifest_path) if manifest_path is not None else Path(directory) / MANIFEST_FILE).is_file()


def verify_manifest(directory: str | os.PathLike, manifest_path: str | os.PathLike | None = None) -> None:
    """Check that every file the manifest lists is in `directory` with its size.

    Raises `CheckpointError` (one line: the directory, the file, what is wrong). No manifest: no check.
    """
    directory = Path(directory)
    path = Path(manifest_path) if manifest_path is not None else directory / MANIFEST_FILE
    if not path.is_file():
        return
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{directory}: its manifest {path.name} has {size} bytes (at most {MAX_MANIFEST_BYTES})")
    try:
        expected = json.loads(path.read_text())["files"]
        if not isinstance(expected, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}: its manifest {path.name} is unreadable ({e})") from None
    for rel, size in expected.items():
        file = directory / rel
        if not file.is_file():
            raise CheckpointError(f"{directory} is damaged: {rel} is missing")
        got = file.stat().st_size
        if got != size:
            raise CheckpointError(f"{directory} is damaged: {rel} has {got} bytes, the checkpoint wrote {size}")
