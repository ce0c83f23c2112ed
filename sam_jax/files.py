"""Reading and writing the files every part of sam-jax shares: images, JSON, atomic writes.

image = read_image("photo.jpg")          # (H, W, 3) uint8 RGB, or FileFormatError
write_json("out/result.json", result)    # atomic: a crash never leaves half a file
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# What `sam-jax auto`, the data readers and the data engine take as images in a folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class FileFormatError(ValueError):
    """A file is missing, unreadable or not what it should be; the message names it."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB, decoded whole (a truncated file is an error)."""
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise FileFormatError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FileFormatError(f"{path}: unreadable image: {e}") from None
    return np.asarray(rgb, np.uint8)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file whose top level is an object -> that dict."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{path}: unreadable JSON: top level is {type(data).__name__}, not an object")
    return data


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`.

    A crash never leaves a partial file under the final name. The file gets the usual mode of a
    new file (0666 less the umask), not the 0600 of a temporary file.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> Path:
    """Write `obj` as JSON, atomically (`write_atomic`)."""
    text = json.dumps(obj, indent=indent)
    return write_atomic(path, lambda tmp: tmp.write_text(text))
