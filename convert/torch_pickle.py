"""Read PyTorch checkpoints (`torch.save` zip format) into numpy, without torch.

A checkpoint written by `torch.save` (torch >= 1.6) is a zip archive whose
records share one top-level folder `<prefix>/`:

* `<prefix>/data.pkl`: a pickle of the saved object; each tensor in it is a call
  to `torch._utils._rebuild_tensor_v2` whose storage is a persistent id
  `("storage", <torch.XxxStorage>, key, location, numel)`;
* `<prefix>/data/<key>`: the raw bytes of storage `key`, `numel` elements;
* `<prefix>/byteorder`: `little` or `big` (absent in older files: little).

The same format holds every PyTorch checkpoint of the SAM family: the official
`.pth` files, HQ-SAM and MobileSAM `.pth` files, and SAM 2 `.pt` files (whose
state dict sits under `"model"`), so the guarantees below cover all of them.

No code named by the file runs, and the memory the reader allocates is bounded
by the file's own metadata, checked before anything large is read:

* The pickle. `data.pkl` is read by `_SafeUnpickler`, the pure-Python
  unpickler (`pickle._Unpickler`, as torch's `weights_only` loader also uses a
  Python one) restricted to the opcodes a tensor state dict needs; any other
  opcode is refused. Its memo is a dict, and a memo slot beyond the number of
  objects stored so far is refused (picklers fill the memo in order), so no
  index can size anything. Globals resolve only to the stand-ins in
  `_ALLOWED_GLOBALS` (never to torch); any other raises `UnsafeCheckpointError`
  before it is resolved. REDUCE may call only those stand-ins, BUILD only drops
  the attributes of an `OrderedDict`, dict keys must be scalars (so hashing is
  cheap), and no allowed opcode copies an existing container: the objects built
  take at most a constant times the size of `data.pkl`, itself capped at
  `MAX_PICKLE_BYTES`. On vit_h's pickle (100 kB of metadata for 2.5 GB of
  tensors) it takes about 15 ms where the C unpickler takes 4 ms: under 1% of
  the load.
* The zip records. Each record's declared size is checked before it is read:
  records are stored or deflated (torch writes them stored); a stored record's
  declared size must equal its stored size, a deflated one cannot declare more
  than deflate can produce (`_DEFLATE_MAX_RATIO`), and no record extends past
  the end of the file. Storage records are then read one at a time (a stored
  one with a single read, a deflated one inflated in chunks) straight into
  their output array when a storage holds one whole tensor (the usual case),
  otherwise into one storage buffer that its tensors are copied out of: never
  more than one copy of a tensor beyond the output.
* The tensors, from metadata alone. Before any storage is read: a shape has at
  most 64 dimensions and sizes, strides and offsets below 2**48; every tensor
  lies within the `numel` elements its storage declares; every storage record
  the state dict uses holds exactly `numel * itemsize` bytes; the storages
  together inflate at most `_MAX_STORAGE_RATIO` times their compressed size
  (beyond `_RATIO_FREE_BYTES`); and the arrays returned total at most
  `_VIEW_SLACK_BYTES` more than those records (views may repeat elements: a
  broadcast, windows into one storage). A caller that knows the model passes
  `check_shapes`, which sees every tensor's shape before any storage is read.

Every refusal is a one-line `CheckpointError` naming the file, the record and
the sizes. Tensors come back as owned numpy arrays, bfloat16 as
`ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import CheckpointError, UnsafeCheckpointError

__all__ = ["MAX_PICKLE_BYTES", "load_torch_checkpoint"]

# torch.serialization.MAGIC_NUMBER, which the legacy (pre-1.6) format pickles first.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ZIP_LOCAL_HEADER = b"PK\x03\x04"
_LOCAL_HEADER_BYTES = 30
# Keys under which training checkpoints commonly nest the model's state dict.
_WRAPPER_KEYS = ("model", "state_dict")

# vit_h's data.pkl is 100 kB; a pickle of tensor metadata 640 times that is not a checkpoint.
MAX_PICKLE_BYTES = 64 << 20
_MAX_BYTEORDER_BYTES = 16
# Deflate emits at least 2 bits per 258-byte match: no stream inflates more than 1032:1.
_DEFLATE_MAX_RATIO = 1032
# Trained weights barely compress (about 1.1:1); a zip whose storages inflate more than this
# (once past `_RATIO_FREE_BYTES`, so small all-zero checkpoints stay readable) is a deflate bomb.
_MAX_STORAGE_RATIO = 16
_RATIO_FREE_BYTES = 64 << 20
# How far the arrays may total beyond the storage bytes they view (broadcasts, overlapping views).
_VIEW_SLACK_BYTES = 64 << 20
_MAX_NDIM = 64
_MAX_INDEX = 1 << 48  # bound on any size, stride, offset or storage numel
_MAX_STORAGE_KEY = 256
_CHUNK_BYTES = 8 << 20  # storages are streamed in chunks of this size

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
    """A storage named by a persistent id: record `data/<key>`, `numel` elements of `dtype`."""

    key: str
    dtype: np.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor as the pickle describes it, materialised once unpickling is done."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def extent(self) -> int:
        """How many elements of the storage the tensor reaches (0 for an empty tensor)."""
        if self.numel == 0:
            return 0
        return self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.strides, strict=True)) + 1


def _short(value: object, depth: int = 2) -> str:
    """A bounded description of an unpickled value, for error messages."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)  # ints are at most 255 bytes long (LONG1)
    if isinstance(value, (str, bytes)):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, _StorageType):
        return f"torch.{value.name}"
    if isinstance(value, tuple) and depth > 0:
        items = [_short(v, depth - 1) for v in value[:8]] + (["..."] if len(value) > 8 else [])
        return f"({', '.join(items)}{',' if len(value) == 1 else ''})"
    size = f" of {len(value)}" if isinstance(value, (tuple, list, dict)) else ""
    return f"<{type(value).__name__}{size}>"


def _is_index(value: object) -> bool:
    return type(value) is int and 0 <= value < _MAX_INDEX


def _index_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > _MAX_NDIM or not all(_is_index(v) for v in value):
        raise ValueError(f"tensor {what} {_short(value)} is not a tuple of at most {_MAX_NDIM} ints in [0, 2**48)")
    return value


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
        raise ValueError(f"tensor storage offset {_short(storage_offset)} is not an int in [0, 2**48)")
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


def _ordered_dict() -> OrderedDict:
    """Stand-in for `collections.OrderedDict`: pickles build one empty, then set its items."""
    return OrderedDict()


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): _ordered_dict,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}
_CALLABLES = tuple(value for value in _ALLOWED_GLOBALS.values() if callable(value))

_OPCODE_NAMES = {
    code[0]: name
    for name, code in vars(pickle).items()
    if name.isupper() and isinstance(code, bytes) and len(code) == 1
}
# The opcodes `torch.save` (protocol 2, or a higher one when asked) writes for a state dict.
_ALLOWED_OPCODES = frozenset(
    op[0]
    for op in (
        *(pickle.PROTO, pickle.FRAME, pickle.STOP, pickle.MARK, pickle.POP, pickle.POP_MARK, pickle.DUP),
        *(pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE, pickle.BININT, pickle.BININT1, pickle.BININT2),
        *(pickle.LONG1, pickle.BINFLOAT, pickle.SHORT_BINUNICODE, pickle.BINUNICODE),
        *(pickle.SHORT_BINBYTES, pickle.BINBYTES),
        *(pickle.EMPTY_TUPLE, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3),
        *(pickle.EMPTY_LIST, pickle.APPEND, pickle.APPENDS, pickle.EMPTY_DICT, pickle.SETITEM, pickle.SETITEMS),
        *(pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE, pickle.BINGET, pickle.LONG_BINGET),
        *(pickle.GLOBAL, pickle.STACK_GLOBAL, pickle.REDUCE, pickle.BUILD, pickle.BINPERSID),
    )
)


class _Dispatch(dict):
    """The unpickler's opcode table; an opcode outside it is refused by name."""

    def __missing__(self, op: int) -> Callable:
        name = _OPCODE_NAMES.get(op, "an unknown opcode")
        raise pickle.UnpicklingError(f"opcode {bytes([op])!r} ({name}) is not one a tensor checkpoint uses")


def _is_plain_key(key: object) -> bool:
    """Whether `key` may key a dict: a scalar, or a flat tuple of scalars (cheap to hash)."""
    scalar = (str, bytes, int, float, bool, type(None))
    return isinstance(key, scalar) or (
        type(key) is tuple and len(key) <= _MAX_NDIM and all(isinstance(k, scalar) for k in key)
    )


class _SafeUnpickler(pickle._Unpickler):
    """Unpickles `data.pkl` with `_ALLOWED_OPCODES`, `_ALLOWED_GLOBALS` and storage persistent ids.

    The memory it takes is bounded by the size of the pickle (see the module docstring).
    """

    def __init__(self, data: bytes, checkpoint: str, record: str) -> None:
        super().__init__(io.BytesIO(data))
        self._checkpoint = checkpoint
        self._record = record
        self._size = len(data)
        self._storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {self._checkpoint}: its pickle asks for the global "
                f"'{module[:80]}.{name[:80]}', which a tensor checkpoint never needs"
            ) from None

    def persistent_load(self, pid: object) -> _StorageRef:
        match pid:
            case ("storage", _StorageType(dtype=dtype), str() as key, str(), int() as numel):
                if not 0 < len(key) <= _MAX_STORAGE_KEY or not _is_index(numel):
                    raise pickle.UnpicklingError(f"storage id {_short(pid)} has a bad key or element count")
                ref = _StorageRef(key, dtype, numel)
                known = self._storages.setdefault(key, ref)
                if known != ref:
                    raise pickle.UnpicklingError(
                        f"storage '{key[:80]}' is declared as {known.numel} {known.dtype} elements "
                        f"and as {numel} {dtype} elements"
                    )
                return known
        raise pickle.UnpicklingError(f"unsupported persistent id {_short(pid)}")

    def _memo_put(self, index: int) -> None:
        if index > len(self.memo):
            raise CheckpointError(
                f"{self._checkpoint} is corrupt: record '{self._record}' ({self._size} bytes) stores "
                f"pickle memo slot {index} when only {len(self.memo)} slots are filled; a pickle fills "
                "its memo in order"
            )
        self.memo[index] = self.stack[-1]

    def load_binput(self) -> None:
        self._memo_put(self.read(1)[0])

    def load_long_binput(self) -> None:
        self._memo_put(struct.unpack("<I", self.read(4))[0])

    def load_memoize(self) -> None:
        self._memo_put(len(self.memo))

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is allowed for allowed in _CALLABLES) or type(args) is not tuple:
            raise pickle.UnpicklingError(f"REDUCE calls {_short(func)} with {_short(args)}")
        self.stack[-1] = func(*args)

    def load_build(self) -> None:
        state = self.stack.pop()
        if type(self.stack[-1]) is not OrderedDict:
            raise pickle.UnpicklingError(f"BUILD sets the state of a {type(self.stack[-1]).__name__}")
        del state  # an OrderedDict's attributes (a state dict's `_metadata`) are not needed

    def _dict(self) -> dict:
        target = self.stack[-1]
        if type(target) not in (dict, OrderedDict):
            raise pickle.UnpicklingError(f"SETITEM on a {type(target).__name__}")
        return target

    def _set(self, target: dict, key: object, value: object) -> None:
        if not _is_plain_key(key):
            raise pickle.UnpicklingError(f"dict key {_short(key)} is not a string, number or flat tuple")
        target[key] = value

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._set(self._dict(), key, value)

    def load_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("SETITEMS with an odd number of items")
        target = self._dict()
        for i in range(0, len(items), 2):
            self._set(target, items[i], items[i + 1])

    def _list(self) -> list:
        if type(self.stack[-1]) is not list:
            raise pickle.UnpicklingError(f"APPEND on a {type(self.stack[-1]).__name__}")
        return self.stack[-1]

    def load_append(self) -> None:
        value = self.stack.pop()
        self._list().append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._list().extend(items)

    def load_stack_global(self) -> None:
        name = self.stack.pop()
        module = self.stack.pop()
        if type(name) is not str or type(module) is not str:
            raise pickle.UnpicklingError("STACK_GLOBAL needs two strings")
        self.append(self.find_class(module, name))

    dispatch = _Dispatch({op: pickle._Unpickler.dispatch[op] for op in _ALLOWED_OPCODES})
    dispatch.update(
        {
            pickle.BINPUT[0]: load_binput,
            pickle.LONG_BINPUT[0]: load_long_binput,
            pickle.MEMOIZE[0]: load_memoize,
            pickle.REDUCE[0]: load_reduce,
            pickle.BUILD[0]: load_build,
            pickle.SETITEM[0]: load_setitem,
            pickle.SETITEMS[0]: load_setitems,
            pickle.APPEND[0]: load_append,
            pickle.APPENDS[0]: load_appends,
            pickle.STACK_GLOBAL[0]: load_stack_global,
        }
    )


def load_torch_checkpoint(
    path: str | os.PathLike[str],
    *,
    check_shapes: Callable[[Mapping[str, tuple[int, ...]]], None] | None = None,
) -> dict[str, np.ndarray]:
    """Read a `torch.save` zip checkpoint into a flat `{name: array}` state dict.

    The saved object must be a dict of tensors, or a dict holding one under
    `"model"` or `"state_dict"` (other entries of such a wrapper are ignored).
    Keys keep their saved order; every array is an owned, C-contiguous copy in
    native byte order. torch is not imported and the pickle can call nothing but
    the tensor-rebuilding stand-ins in this module.

    check_shapes: called with `{name: shape}` of every tensor once the pickle is
        read and checked, before any storage is read; it raises `CheckpointError`
        to refuse the checkpoint (for example, shapes that are not the model's).

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allow-list.
        CheckpointError: the file is missing, unreadable, truncated, in the legacy
            (pre-1.6) format, does not hold a tensor state dict, or declares sizes
            that its records do not hold or that no checkpoint needs (see the
            module docstring).
    """
    checkpoint = os.fspath(path)
    with _open_zip(checkpoint) as archive, open(checkpoint, "rb") as file:
        records = _Records(archive, file, os.fstat(file.fileno()).st_size)
        prefix = _record_prefix(checkpoint, archive)
        big_endian = _is_big_endian(checkpoint, records, prefix)
        record = prefix + "data.pkl"
        info = _checked_info(checkpoint, records, record, limit=MAX_PICKLE_BYTES)
        root = _unpickle(checkpoint, record, _read_small(checkpoint, records, info))
        tensors = _state_dict(checkpoint, root)
        storages = _check_tensors(checkpoint, records, prefix, tensors)
        if check_shapes is not None:
            check_shapes({name: ref.shape for name, ref in tensors.items()})
        return _materialize(checkpoint, records, storages, tensors, big_endian)


@dataclass(frozen=True, slots=True)
class _Records:
    """An open checkpoint: its zip directory, a file handle for stored records, and its size."""

    archive: zipfile.ZipFile
    file: io.BufferedReader
    size: int


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
    except (ValueError, EOFError, NotImplementedError, OverflowError, struct.error) as exc:
        raise CheckpointError(f"{checkpoint} is corrupt: its zip directory is unreadable ({_reason(exc)})") from exc


def _reason(exc: BaseException) -> str:
    """`Type: message` of an exception, on one short line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


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


def _checked_info(
    checkpoint: str,
    records: _Records,
    record: str,
    *,
    limit: int | None = None,
    exact: tuple[int, str] | None = None,
    noun: str = "record",
) -> zipfile.ZipInfo:
    """The zip entry of `record`, once its declared size is known to be safe to read.

    limit: the most bytes the record may declare. exact: (bytes, what) it must declare.
    noun: what error messages call the record.
    """
    try:
        info = records.archive.getinfo(record)
    except KeyError:
        raise CheckpointError(f"{checkpoint} is truncated: {noun} '{record}' is missing") from None
    declared, stored = info.file_size, info.compress_size
    if exact is not None and declared != exact[0]:
        state = "truncated" if declared < exact[0] else "corrupt"
        raise CheckpointError(
            f"{checkpoint} is {state}: {noun} '{record}' holds {declared} bytes, but {exact[1]} ({exact[0]} bytes)"
        )
    if limit is not None and declared > limit:
        raise CheckpointError(
            f"{checkpoint} is corrupt: record '{record}' declares {declared} bytes, "
            f"more than the {limit} bytes such a record may hold"
        )
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{checkpoint} is corrupt: record '{record}' is encrypted")
    if info.compress_type == zipfile.ZIP_STORED and stored != declared:
        raise CheckpointError(
            f"{checkpoint} is corrupt: record '{record}' declares {declared} bytes but stores {stored}"
        )
    if info.compress_type == zipfile.ZIP_DEFLATED and declared > _DEFLATE_MAX_RATIO * stored:
        raise CheckpointError(
            f"{checkpoint} is corrupt: record '{record}' declares {declared} bytes from {stored} deflated "
            f"bytes, more than deflate's {_DEFLATE_MAX_RATIO}:1 can produce"
        )
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(
            f"{checkpoint} is corrupt: record '{record}' uses zip compression method {info.compress_type}; "
            "PyTorch checkpoints store records uncompressed (or deflated)"
        )
    if info.header_offset < 0 or info.header_offset + stored > records.size:
        raise CheckpointError(
            f"{checkpoint} is truncated: record '{record}' ({stored} bytes at offset {info.header_offset}) "
            f"ends past the end of the {records.size}-byte file"
        )
    return info


def _read_into(checkpoint: str, records: _Records, info: zipfile.ZipInfo, out: np.ndarray) -> None:
    """Read record `info` into the flat uint8 array `out`, exactly its declared size.

    A stored record is read straight into `out` and its CRC checked there; a deflated one
    is inflated `_CHUNK_BYTES` at a time.
    """
    try:
        if info.compress_type == zipfile.ZIP_STORED:
            filled = _read_stored(checkpoint, records, info, out)
        else:
            filled = 0
            with records.archive.open(info) as file:
                while filled < len(out):
                    chunk = file.read(min(_CHUNK_BYTES, len(out) - filled))
                    if not chunk:
                        break
                    out[filled : filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
                    filled += len(chunk)
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        NotImplementedError,
        RuntimeError,
        ValueError,
        struct.error,
    ) as exc:
        raise CheckpointError(
            f"{checkpoint} is corrupt: cannot read record '{info.filename}' ({_reason(exc)})"
        ) from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {checkpoint}: {exc.strerror or exc}") from exc
    if filled != len(out):
        raise CheckpointError(
            f"{checkpoint} is truncated: record '{info.filename}' ends after {filled} of its {len(out)} bytes"
        )


def _read_stored(checkpoint: str, records: _Records, info: zipfile.ZipInfo, out: np.ndarray) -> int:
    """Read the stored record `info` into `out` with one copy; returns the bytes read."""
    file = records.file
    file.seek(info.header_offset)
    header = file.read(_LOCAL_HEADER_BYTES)
    if len(header) != _LOCAL_HEADER_BYTES or not header.startswith(_ZIP_LOCAL_HEADER):
        raise zipfile.BadZipFile("bad local file header")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    name = file.read(name_length)
    if name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise zipfile.BadZipFile(f"its local header names {_short(name)}")
    file.seek(extra_length, os.SEEK_CUR)
    view, filled = memoryview(out), 0
    while filled < len(out):
        count = file.readinto(view[filled:])
        if not count:
            return filled
        filled += count
    if zlib.crc32(out) != info.CRC:
        raise zipfile.BadZipFile("its CRC-32 does not match")
    return filled


def _read_small(checkpoint: str, records: _Records, info: zipfile.ZipInfo) -> bytes:
    """The bytes of a record whose declared size has been checked."""
    data = np.empty(info.file_size, np.uint8)
    _read_into(checkpoint, records, info, data)
    return data.tobytes()


def _is_big_endian(checkpoint: str, records: _Records, prefix: str) -> bool:
    record = prefix + "byteorder"
    try:
        records.archive.getinfo(record)
    except KeyError:
        return False
    info = _checked_info(checkpoint, records, record, limit=_MAX_BYTEORDER_BYTES)
    byteorder = _read_small(checkpoint, records, info).strip()
    if byteorder not in (b"little", b"big"):
        raise CheckpointError(
            f"{checkpoint} is corrupt: record '{record}' says {byteorder[:20]!r}, not 'little' or 'big'"
        )
    return byteorder == b"big"


def _unpickle(checkpoint: str, record: str, data: bytes) -> object:
    try:
        return _SafeUnpickler(data, checkpoint, record).load()
    except CheckpointError:
        raise
    except Exception as exc:
        # Any other failure of the unpickler or the stand-ins means malformed data.
        raise CheckpointError(f"{checkpoint} is corrupt: cannot unpickle '{record}' ({_reason(exc)})") from exc


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
            raise CheckpointError(f"{checkpoint} is not a tensor state dict: key {_short(key)}{where} is not a string")
        if not isinstance(value, _TensorRef):
            raise CheckpointError(
                f"{checkpoint} is not a tensor state dict: "
                f"entry '{key[:200]}'{where} is a {type(value).__name__}, not a tensor"
            )
    return root


def _check_tensors(
    checkpoint: str,
    records: _Records,
    prefix: str,
    tensors: dict[str, _TensorRef],
) -> dict[str, tuple[zipfile.ZipInfo, _StorageRef]]:
    """Check every tensor and the storage records they use from metadata alone.

    Returns {storage key: (its zip entry, the storage)}, each entry's size checked.
    """
    storages: dict[str, _StorageRef] = {}
    out_bytes = 0
    for name, ref in tensors.items():
        storage = ref.storage
        record = f"{prefix}data/{storage.key}"
        if ref.extent() > storage.numel:
            raise CheckpointError(
                f"{checkpoint} is corrupt: tensor '{name[:200]}' of shape {ref.shape} (offset {ref.offset}, "
                f"strides {ref.strides}) reaches element {ref.extent()} of storage '{record}', "
                f"which the pickle declares with {storage.numel} elements"
            )
        storages[storage.key] = storage
        out_bytes += ref.numel * storage.dtype.itemsize
    entries: dict[str, tuple[zipfile.ZipInfo, _StorageRef]] = {}
    declared = stored = 0
    for key, storage in storages.items():
        record = f"{prefix}data/{key}"
        what = f"the pickle declares {storage.numel} {storage.dtype} elements"
        info = _checked_info(checkpoint, records, record, exact=(storage.nbytes, what), noun="storage")
        entries[key] = (info, storage)
        declared += info.file_size
        stored += info.compress_size
    if declared > max(_MAX_STORAGE_RATIO * stored, _RATIO_FREE_BYTES):
        raise CheckpointError(
            f"{checkpoint} is corrupt: its storage records declare {declared} bytes from {stored} compressed "
            f"bytes; tensor data does not compress beyond {_MAX_STORAGE_RATIO}:1"
        )
    if out_bytes > declared + _VIEW_SLACK_BYTES:
        raise CheckpointError(
            f"{checkpoint} is corrupt: its tensors total {out_bytes} bytes, more than the {declared} bytes of "
            f"the storage records they view plus {_VIEW_SLACK_BYTES} bytes of repeated elements"
        )
    return entries


def _is_c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    step = 1
    for n, s in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1 and s != step:
            return False
        step *= n
    return True


def _materialize(
    checkpoint: str,
    records: _Records,
    storages: dict[str, tuple[zipfile.ZipInfo, _StorageRef]],
    tensors: dict[str, _TensorRef],
    big_endian: bool,
) -> dict[str, np.ndarray]:
    """Copy each tensor out of its storage, streaming each storage record once.

    A storage that holds exactly one whole, C-ordered tensor is read straight into
    that tensor's array; any other is read into one buffer and its tensors copied out.
    """
    names_by_storage: dict[str, list[str]] = {}
    for name, ref in tensors.items():
        names_by_storage.setdefault(ref.storage.key, []).append(name)
    arrays: dict[str, np.ndarray] = {}
    for key, names in names_by_storage.items():
        info, storage = storages[key]
        dtype = storage.dtype
        refs = [tensors[name] for name in names]
        if all(ref.numel == 0 for ref in refs):
            arrays.update((name, np.empty(ref.shape, dtype)) for name, ref in zip(names, refs, strict=True))
            continue
        ref = refs[0]
        if (
            len(refs) == 1
            and ref.offset == 0
            and ref.numel == storage.numel
            and _is_c_contiguous(ref.shape, ref.strides)
        ):
            array = np.empty(ref.shape, dtype)
            _read_into(checkpoint, records, info, array.reshape(-1).view(np.uint8))
            arrays[names[0]] = _native(array, big_endian)
            continue
        raw = np.empty(storage.nbytes, np.uint8)
        _read_into(checkpoint, records, info, raw)
        elements = raw.view(dtype)
        for name, ref in zip(names, refs, strict=True):
            if ref.numel == 0:
                arrays[name] = np.empty(ref.shape, dtype)
                continue
            view = np.lib.stride_tricks.as_strided(
                elements[ref.offset :],
                shape=ref.shape,
                strides=tuple(s * dtype.itemsize for s in ref.strides),
                writeable=False,
            )
            arrays[name] = _native(view.copy(), big_endian)
        del raw, elements
    return {name: arrays[name] for name in tensors}


def _native(array: np.ndarray, big_endian: bool) -> np.ndarray:
    """`array` (owned) in native byte order, swapped in place when the file is big-endian."""
    if big_endian and array.dtype.itemsize > 1:
        array.view(f"u{array.dtype.itemsize}").byteswap(inplace=True)
    return array
