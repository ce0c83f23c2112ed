"""Read PyTorch checkpoints (`torch.save` zip format) into numpy, without torch.

A checkpoint written by `torch.save` (torch >= 1.6) is a zip archive whose
records share one top-level folder `<prefix>/`:

* `<prefix>/data.pkl`: a pickle of the saved object; each tensor in it is a call
  to `torch._utils._rebuild_tensor_v2` whose storage is a persistent id
  `("storage", <torch.XxxStorage>, key, location, numel)`;
* `<prefix>/data/<key>`: the raw bytes of storage `key`;
* `<prefix>/byteorder`: `little` or `big` (absent in older files: little).

`load_torch_checkpoint` unpickles `data.pkl` with an unpickler whose
`find_class` resolves only a short allow-list of globals, each to a local
stand-in (never to torch itself); any other global raises
`UnsafeCheckpointError` before it is resolved, so no code the file names can
run. Tensors come back as owned numpy arrays, bfloat16 as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import CheckpointError, UnsafeCheckpointError

__all__ = ["load_torch_checkpoint"]

# torch.serialization.MAGIC_NUMBER, which the legacy (pre-1.6) format pickles first.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ZIP_LOCAL_HEADER = b"PK\x03\x04"
# Keys under which training checkpoints commonly nest the model's state dict.
_WRAPPER_KEYS = ("model", "state_dict")

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for a typed storage class such as `torch.FloatStorage`."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """A storage named by a persistent id: record `data/<key>`, read as `dtype`."""

    key: str
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor as the pickle describes it, materialised once unpickling is done."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _index_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(_is_index(v) for v in value):
        raise ValueError(f"tensor {what} {value!r:.80} is not a tuple of non-negative ints")
    return value


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    metadata: object = None,
) -> _TensorRef:
    """Stand-in for `torch._utils._rebuild_tensor_v2`: records where the tensor lies."""
    del requires_grad, backward_hooks, metadata  # autograd state has no numpy counterpart
    if not isinstance(storage, _StorageRef):
        raise TypeError(f"tensor storage is a {type(storage).__name__}, not a storage record")
    if not _is_index(storage_offset):
        raise ValueError(f"tensor storage offset {storage_offset!r:.80} is not a non-negative int")
    shape = _index_tuple(size, "size")
    strides = _index_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"tensor size {shape} and stride {strides} differ in length")
    return _TensorRef(storage, storage_offset, shape, strides)


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object) -> _TensorRef:
    """Stand-in for `torch._utils._rebuild_parameter`: a parameter is its tensor."""
    del requires_grad, backward_hooks
    if not isinstance(data, _TensorRef):
        raise TypeError(f"parameter data is a {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(
    data: object, requires_grad: object, backward_hooks: object, state: object
) -> _TensorRef:
    """Stand-in for `torch._utils._rebuild_parameter_with_state`; the Python state is dropped."""
    del state
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl`, resolving only `_ALLOWED_GLOBALS` and storage persistent ids."""

    def __init__(self, data: bytes, checkpoint: str) -> None:
        super().__init__(io.BytesIO(data))
        self._checkpoint = checkpoint

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {self._checkpoint}: its pickle asks for the global "
                f"'{module}.{name}', which a tensor checkpoint never needs"
            ) from None

    def persistent_load(self, pid: object) -> _StorageRef:
        match pid:
            case ("storage", _StorageType(dtype=dtype), str() as key, str(), int()):
                return _StorageRef(key, dtype)
        raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")


def load_torch_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a `torch.save` zip checkpoint into a flat `{name: array}` state dict.

    The saved object must be a dict of tensors, or a dict holding one under
    `"model"` or `"state_dict"` (other entries of such a wrapper are ignored).
    Keys keep their saved order; every array is an owned, C-contiguous copy in
    native byte order. torch is not imported and the pickle can call nothing but
    the tensor-rebuilding stand-ins in this module.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allow-list.
        CheckpointError: the file is missing, unreadable, truncated, in the legacy
            (pre-1.6) format, or does not hold a tensor state dict.
    """
    checkpoint = os.fspath(path)
    with _open_zip(checkpoint) as archive:
        prefix = _record_prefix(checkpoint, archive)
        big_endian = _is_big_endian(checkpoint, archive, prefix)
        root = _unpickle(checkpoint, _read_record(checkpoint, archive, prefix + "data.pkl"))
        return _materialize(checkpoint, archive, prefix, _state_dict(checkpoint, root), big_endian)


def _open_zip(checkpoint: str) -> zipfile.ZipFile:
    try:
        with open(checkpoint, "rb") as file:
            head = file.read(512)
    except FileNotFoundError:
        raise CheckpointError(f"cannot load {checkpoint}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {checkpoint}: {exc.strerror or exc}") from exc
    if not head:
        raise CheckpointError(f"{checkpoint} is empty (0 bytes), not a PyTorch checkpoint")
    if _LEGACY_MAGIC in head[:32] or head[257:262] == b"ustar":
        raise CheckpointError(
            f"{checkpoint} is in the legacy (pre-1.6) PyTorch format, which is not supported; "
            "load it with torch and torch.save it again with torch >= 1.6"
        )
    try:
        return zipfile.ZipFile(checkpoint)
    except zipfile.BadZipFile:
        if head.startswith(_ZIP_LOCAL_HEADER):
            problem = "is truncated: its zip central directory is missing"
        else:
            problem = "is not a PyTorch zip checkpoint (truncated or not a zip file)"
        raise CheckpointError(f"{checkpoint} {problem}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {checkpoint}: {exc.strerror or exc}") from exc


def _record_prefix(checkpoint: str, archive: zipfile.ZipFile) -> str:
    """The `<prefix>/` folder that holds `data.pkl` and the other records."""
    prefixes = [
        name.removesuffix("data.pkl")
        for name in archive.namelist()
        if name.endswith("/data.pkl") and name.count("/") == 1
    ]
    if len(prefixes) != 1:
        found = "no" if not prefixes else f"{len(prefixes)}"
        raise CheckpointError(
            f"{checkpoint} is a zip file but not a PyTorch checkpoint: "
            f"it holds {found} '<folder>/data.pkl' records, not one"
        )
    return prefixes[0]


def _read_record(checkpoint: str, archive: zipfile.ZipFile, record: str) -> bytes:
    """The bytes of `record`, which must be in `archive`."""
    try:
        return archive.read(record)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise CheckpointError(f"{checkpoint} is corrupt: cannot read record '{record}' ({exc})") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {checkpoint}: {exc.strerror or exc}") from exc


def _has_record(archive: zipfile.ZipFile, record: str) -> bool:
    try:
        archive.getinfo(record)
    except KeyError:
        return False
    return True


def _is_big_endian(checkpoint: str, archive: zipfile.ZipFile, prefix: str) -> bool:
    record = prefix + "byteorder"
    if not _has_record(archive, record):
        return False
    byteorder = _read_record(checkpoint, archive, record).strip()
    if byteorder not in (b"little", b"big"):
        raise CheckpointError(
            f"{checkpoint} is corrupt: record '{record}' says {byteorder[:20]!r}, not 'little' or 'big'"
        )
    return byteorder == b"big"


def _unpickle(checkpoint: str, data: bytes) -> object:
    try:
        return _SafeUnpickler(data, checkpoint).load()
    except CheckpointError:
        raise
    except Exception as exc:
        # Any other failure of the unpickler or the stand-ins means malformed data.
        raise CheckpointError(
            f"{checkpoint} is corrupt: cannot unpickle data.pkl ({type(exc).__name__}: {exc})"
        ) from exc


def _state_dict(checkpoint: str, root: object) -> dict[str, _TensorRef]:
    """The flat `{name: tensor}` dict in `root`, unwrapping a `model`/`state_dict` entry."""
    if not isinstance(root, dict):
        raise CheckpointError(f"{checkpoint} holds a {type(root).__name__}, not a state dict")
    where = ""
    for wrapper in _WRAPPER_KEYS:
        if isinstance(root.get(wrapper), dict):
            root, where = root[wrapper], f" under '{wrapper}'"
            break
    for key, value in root.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{checkpoint} is not a tensor state dict: key {key!r:.80}{where} is not a string")
        if not isinstance(value, _TensorRef):
            raise CheckpointError(
                f"{checkpoint} is not a tensor state dict: "
                f"entry '{key}'{where} is a {type(value).__name__}, not a tensor"
            )
    return root


def _materialize(
    checkpoint: str,
    archive: zipfile.ZipFile,
    prefix: str,
    tensors: dict[str, _TensorRef],
    big_endian: bool,
) -> dict[str, np.ndarray]:
    """Copy each tensor out of its storage, reading each storage record once."""
    names_by_storage: dict[str, list[str]] = {}
    for name, ref in tensors.items():
        names_by_storage.setdefault(ref.storage.key, []).append(name)
    arrays: dict[str, np.ndarray] = {}
    for key, names in names_by_storage.items():
        record = f"{prefix}data/{key}"
        if not _has_record(archive, record):
            raise CheckpointError(f"{checkpoint} is truncated: storage '{record}' is missing")
        raw = np.frombuffer(_read_record(checkpoint, archive, record), dtype=np.uint8)
        for name in names:
            arrays[name] = _copy_tensor(checkpoint, name, record, raw, tensors[name], big_endian)
    return {name: arrays[name] for name in tensors}


def _copy_tensor(
    checkpoint: str, name: str, record: str, raw: np.ndarray, ref: _TensorRef, big_endian: bool
) -> np.ndarray:
    """An owned, native-order copy of tensor `ref` out of the storage bytes `raw`."""
    dtype = ref.storage.dtype
    if 0 in ref.shape:
        return np.empty(ref.shape, dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides, strict=True))
    needed = (last + 1) * dtype.itemsize
    if needed > raw.size:
        raise CheckpointError(
            f"{checkpoint} is truncated: tensor '{name}' needs {needed} bytes of storage "
            f"'{record}', which holds only {raw.size}"
        )
    elements = raw[: raw.size - raw.size % dtype.itemsize].view(dtype)
    view = np.lib.stride_tricks.as_strided(
        elements[ref.offset :],
        shape=ref.shape,
        strides=tuple(s * dtype.itemsize for s in ref.strides),
        writeable=False,
    )
    array = view.copy()
    if big_endian and dtype.itemsize > 1:
        array.view(f"u{dtype.itemsize}").byteswap(inplace=True)
    return array
