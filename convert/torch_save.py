"""Write PyTorch checkpoints (`torch.save`'s zip format) from numpy, without torch.

`save_torch_checkpoint(path, obj)` writes `obj`, a state dict `{key: array}` or a dict of such
(SAM 2's `{"model": state_dict}`), as `torch.save` would, so that `torch.load(path,
weights_only=True)` returns the same tensors (as `OrderedDict`s). The records, as
`convert.torch_pickle` reads them:

* `archive/data.pkl`: a protocol 2 pickle whose only globals are `collections.OrderedDict`,
  `torch._utils._rebuild_tensor_v2` and a `torch.<Type>Storage` per dtype (the ones the
  `weights_only` loader allows); each tensor is a persistent id `("storage", <Type>Storage,
  key, "cpu", numel)` and contiguous strides;
* `archive/data/<key>`: each tensor's bytes, little-endian, stored (uncompressed);
* `archive/byteorder` ("little") and `archive/version` ("3").

The pickle opcodes are emitted one by one (no object of the file is pickled by reference), so
the writer imports nothing from torch and runs nothing named by a string.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["save_torch_checkpoint"]

_STORAGE = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class _Pickle:
    """Protocol 2 pickle opcodes, appended to a buffer."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def op(self, code: bytes) -> None:
        self.out += code

    def str(self, s: str) -> None:
        data = s.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE

    def int(self, n: int) -> None:
        if -(2**31) <= n < 2**31:
            self.out += b"J" + struct.pack("<i", n)  # BININT
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data  # LONG1

    def glob(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL

    def int_tuple(self, values: tuple[int, ...]) -> None:
        self.op(b"(")  # MARK
        for v in values:
            self.int(v)
        self.op(b"t")  # TUPLE

    def ordered_dict(self) -> None:
        self.glob("collections", "OrderedDict")
        self.op(b")R")  # EMPTY_TUPLE, REDUCE: OrderedDict()


def _tensor(p: _Pickle, key: str, array: np.ndarray) -> None:
    """_rebuild_tensor_v2(storage, 0, shape, contiguous strides, False, OrderedDict())."""
    strides, step = [], 1
    for size in reversed(array.shape):
        strides.append(step)
        step *= size
    p.glob("torch._utils", "_rebuild_tensor_v2")
    p.op(b"(")  # MARK: the arguments
    p.op(b"(")  # MARK: the persistent id
    p.str("storage")
    p.glob("torch", _STORAGE[array.dtype])
    p.str(key)
    p.str("cpu")
    p.int(array.size)
    p.op(b"tQ")  # TUPLE, BINPERSID
    p.int(0)
    p.int_tuple(array.shape)
    p.int_tuple(tuple(reversed(strides)))
    p.op(b"\x89")  # NEWFALSE: requires_grad
    p.ordered_dict()  # backward hooks
    p.op(b"tR")  # TUPLE, REDUCE


def _state_dict(p: _Pickle, tensors: Mapping[str, np.ndarray], records: list[tuple[str, np.ndarray]]) -> None:
    p.ordered_dict()
    p.op(b"(")  # MARK
    for key, value in tensors.items():
        array = np.asarray(value)
        if array.dtype not in _STORAGE:
            raise ValueError(f"{key}: dtype {array.dtype} has no PyTorch storage type here")
        p.str(str(key))
        _tensor(p, str(len(records)), array)
        records.append((str(len(records)), array))
    p.op(b"u")  # SETITEMS


def save_torch_checkpoint(path: str | os.PathLike, obj: Mapping[str, np.ndarray | Mapping[str, np.ndarray]]) -> Path:
    """Write `obj` (a state dict, or a dict whose values are state dicts or arrays) to `path`."""
    path = Path(path)
    p, records = _Pickle(), []
    nested = any(isinstance(v, Mapping) for v in obj.values())
    if nested:
        p.op(b"}")  # EMPTY_DICT
        p.op(b"(")  # MARK
        for key, value in obj.items():
            p.str(str(key))
            if isinstance(value, Mapping):
                _state_dict(p, value, records)
            else:
                array = np.asarray(value)
                _tensor(p, str(len(records)), array)
                records.append((str(len(records)), array))
        p.op(b"u")  # SETITEMS
    else:
        _state_dict(p, obj, records)
    p.op(b".")  # STOP
    name = "archive"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", bytes(p.out))
        z.writestr(f"{name}/byteorder", "little")
        for key, array in records:
            data = np.ascontiguousarray(array)
            data = data.astype(data.dtype.newbyteorder("<"), copy=False)
            with z.open(f"{name}/data/{key}", "w", force_zip64=data.nbytes >= 2**31) as f:
                f.write(memoryview(data.reshape(-1).view(np.uint8)))
        z.writestr(f"{name}/version", "3\n")
    return path
