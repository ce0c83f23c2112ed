"""Hostile checkpoints: each is refused with a one-line CheckpointError, never by running out of memory.

The torch-format cases (official, HQ-SAM and MobileSAM `.pth`, SAM 2 `.pt`) and the safetensors
cases run in a child process under a 1 GiB address-space cap (`RLIMIT_AS`): a reader that allocated
what a file declares would die there with MemoryError, which these tests count as a failure. The
child imports only the reader (as a stand-alone package, so not `sam_jax` and its JAX), numpy and
ml_dtypes, or only safetensors and numpy. Orbax directories need JAX, which reserves more address
space than the cap, so those run in this process: their refusals come from metadata alone.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from sam_jax.convert import torch_pickle
from sam_jax.convert.errors import CheckpointError
from sam_jax.convert.torch_pickle import load_torch_checkpoint

CAP_BYTES = 1 << 30
GIB = 1 << 30
_DEFLATE_SEGMENT = 1 << 20

# Loads each file named on its command line under an address-space cap; prints one JSON line each.
_CHILD = r"""
import json, resource, sys, time, types
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
kind, where, paths = sys.argv[2], sys.argv[3], sys.argv[4:]
if kind == "torch":
    package = types.ModuleType("capped_reader")
    package.__path__ = [where]
    sys.modules["capped_reader"] = package
    from capped_reader.errors import CheckpointError as Refusal
    from capped_reader.torch_pickle import load_torch_checkpoint as load
else:
    from safetensors import SafetensorError as Refusal
    from safetensors.numpy import load_file as load
loaded = sorted({"jax", "torch", "sam_jax"} & set(sys.modules))
assert not loaded, loaded
for path in paths:
    start = time.perf_counter()
    try:
        arrays = load(path)
        outcome, detail = "loaded", str(len(arrays))
        del arrays
    except Refusal as error:
        outcome, detail = "refused", str(error)
    except BaseException as error:
        outcome, detail = "crashed", f"{type(error).__name__}: {error}"
    print(json.dumps([path, outcome, detail, time.perf_counter() - start]), flush=True)
"""


def _load_capped(paths: list[Path], kind: str = "torch") -> dict[str, tuple[str, str, float]]:
    """{path: (outcome, message, seconds)} of loading each file in one capped child process."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    reader = os.path.dirname(torch_pickle.__file__)
    args = [sys.executable, "-c", _CHILD, str(CAP_BYTES), kind, reader, *map(str, paths)]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = {
        path: (outcome, detail, seconds) for path, outcome, detail, seconds in map(json.loads, run.stdout.splitlines())
    }
    assert len(results) == len(paths), run.stderr[-3000:]
    return results


def _refusal(path: Path, kind: str = "torch") -> str:
    """The message of the refusal of `path` in a capped child; fails on a load or a crash."""
    outcome, message, seconds = _load_capped([path], kind)[str(path)]
    assert outcome == "refused", (outcome, message)
    assert str(path) in message and "\n" not in message
    assert seconds < 1.0, seconds
    return message


# ---------------------------------------------------------------------------------------------
# Building torch-format files by hand: a pickle of declared tensors, records with any sizes.


@dataclass(frozen=True)
class _Storage:
    """A storage as a pickle declares it: `("storage", cls, key, "cpu", numel)`."""

    key: str
    numel: int
    cls: type = torch.FloatStorage


@dataclass(frozen=True)
class _Tensor:
    """A tensor as a pickle declares it (`torch._utils._rebuild_tensor_v2`)."""

    storage: _Storage
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0

    def __reduce__(self):
        args = (self.storage, self.offset, self.shape, self.strides, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def _pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


@dataclass(frozen=True)
class _Record:
    name: str
    payload: bytes  # the bytes stored in the zip (deflated when `deflated`)
    size: int  # the uncompressed size the zip declares
    deflated: bool = False
    crc: int | None = None  # default: the CRC-32 of `payload` (right for a stored record)


def _stored(name: str, data: bytes) -> _Record:
    return _Record(name, data, len(data))


def _write_zip(path: Path, records: list[_Record]) -> Path:
    """A zip file with exactly these local headers, sizes and CRCs (zipfile would compute its own)."""
    body, directory = bytearray(), bytearray()
    for r in records:
        name, method = r.name.encode(), zipfile.ZIP_DEFLATED if r.deflated else zipfile.ZIP_STORED
        crc = zlib.crc32(r.payload) if r.crc is None else r.crc
        sizes = (crc, len(r.payload), r.size, len(name))
        directory += struct.pack(
            "<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0, *sizes, 0, 0, 0, 0, 0, len(body)
        )
        directory += name
        body += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0, *sizes, 0) + name + r.payload
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(records), len(records), len(directory), len(body), 0)
    path.write_bytes(bytes(body + directory + end))
    return path


def _checkpoint(path: Path, pkl: bytes, storages: list[_Record] = ()) -> Path:
    records = [_stored("archive/data.pkl", pkl), _stored("archive/byteorder", b"little"), *storages]
    return _write_zip(path, records)


def _deflated_zeros(size: int) -> bytes:
    """A raw deflate stream of `size` zero bytes (a multiple of 1 MiB), about 1000 times smaller."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = compressor.compress(bytes(_DEFLATE_SEGMENT)) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty last block
    return segment * (size // _DEFLATE_SEGMENT) + final


@pytest.fixture(scope="module")
def three_gib_of_zeros() -> bytes:
    # The readers must refuse these records before reading a byte, so their CRC is never reached.
    return _deflated_zeros(3 * GIB)


# ---------------------------------------------------------------------------------------------
# The three bombs.


def test_memo_index_bomb(tmp_path: Path) -> None:
    # LONG_BINPUT into memo slot 2**31 - 16: the C unpickler would size its memo array to ~32 GB.
    pkl = b"\x80\x02Nr" + struct.pack("<I", 0x7FFFFFF0) + b"."
    message = _refusal(_checkpoint(tmp_path / "memo.pth", pkl))
    assert "record 'archive/data.pkl' (9 bytes) stores pickle memo slot 2147483632 when only 0" in message


def test_deflate_bomb_pickle(tmp_path: Path, three_gib_of_zeros: bytes) -> None:
    bomb = _Record("archive/data.pkl", three_gib_of_zeros, 3 * GIB, deflated=True, crc=0)
    path = _write_zip(tmp_path / "deflate.pth", [bomb, _stored("archive/byteorder", b"little")])
    assert path.stat().st_size < 4 << 20
    message = _refusal(path)
    assert f"record 'archive/data.pkl' declares {3 * GIB} bytes, more than the {64 << 20} bytes" in message


@pytest.mark.parametrize("wrapper", [None, "model"])  # "model": a SAM 2 `.pt` file
def test_oversized_storage_record(tmp_path: Path, three_gib_of_zeros: bytes, wrapper: str | None) -> None:
    state = {"w": _Tensor(_Storage("0", 4), (4,), (1,))}
    pkl = _pickle(state if wrapper is None else {wrapper: state, "epoch": 3})
    bomb = _Record("archive/data/0", three_gib_of_zeros, 3 * GIB, deflated=True, crc=0)
    message = _refusal(_checkpoint(tmp_path / "storage.pth", pkl, [bomb]))
    assert (
        f"storage 'archive/data/0' holds {3 * GIB} bytes, but the pickle declares 4 float32 elements (16 bytes)"
        in message
    )


# ---------------------------------------------------------------------------------------------
# Other declared sizes and pickle tricks, refused from metadata, in one capped child.


def _metadata_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """{case: (file, the message it must be refused with)}."""
    huge = (10**6, 10**6)
    small = _stored("archive/data/0", bytes(16))
    cases = {}

    def case(name: str, pkl: bytes, storages: list[_Record], message: str) -> None:
        cases[name] = (_checkpoint(tmp_path / f"{name}.pth", pkl, storages), message)

    case(
        "huge_tensor",
        _pickle({"w": _Tensor(_Storage("0", 4), huge, (10**6, 1))}),
        [small],
        "tensor 'w' of shape (1000000, 1000000) (offset 0, strides (1000000, 1)) reaches element "
        "1000000000000 of storage 'archive/data/0', which the pickle declares with 4 elements",
    )
    case(
        "huge_storage",
        _pickle({"w": _Tensor(_Storage("0", 10**12), huge, (10**6, 1))}),
        [small],
        "storage 'archive/data/0' holds 16 bytes, but the pickle declares 1000000000000 float32 elements",
    )
    case(
        "huge_broadcast",
        _pickle({"w": _Tensor(_Storage("0", 4), huge, (0, 0))}),
        [small],
        "its tensors total 4000000000000 bytes, more than the 16 bytes of the storage records they view",
    )
    case(
        "storage_declared_twice",
        _pickle({"a": _Tensor(_Storage("0", 4), (4,), (1,)), "b": _Tensor(_Storage("0", 2), (2,), (1,))}),
        [small],
        "storage '0' is declared as 4 float32 elements and as 2 float32 elements",
    )
    zeros = 128 << 20
    case(
        "deflated_zeros",
        _pickle({"w": _Tensor(_Storage("0", zeros // 4), (zeros // 4,), (1,))}),
        [_Record("archive/data/0", _deflated_zeros(zeros), zeros, deflated=True, crc=0)],
        f"its storage records declare {zeros} bytes from",
    )
    case(
        "impossible_ratio",
        _pickle({"w": _Tensor(_Storage("0", 1 << 18), (1 << 18,), (1,))}),
        [_Record("archive/data/0", b"\x03\x00" * 5, 1 << 20, deflated=True)],
        "record 'archive/data/0' declares 1048576 bytes from 10 deflated bytes, more than deflate's 1032:1",
    )
    # Pickle opcodes and structures that would allocate or hash without bound.
    case("bytearray8", b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b".", [], "(BYTEARRAY8) is not one")
    case("binbytes8", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b".", [], "(BINBYTES8) is not one")
    nested = b")" + b"2\x86" * 200  # ((...), (...)) 200 deep: 2**200 leaves, shared
    case(
        "hash_bomb",
        b"\x80\x02}" + nested + b"Ns.",
        [],
        "dict key ((<tuple of 2>, <tuple of 2>), (<tuple of 2>, <tuple of 2>)) is not a string",
    )
    case("repr_bomb", b"\x80\x02" + nested + b"Q.", [], "unsupported persistent id ((<tuple of 2>, <tuple of 2>),")
    case(
        "ordered_dict_copy",
        b"\x80\x02ccollections\nOrderedDict\n]" + b"\x85R.",
        [],
        "_ordered_dict() takes 0 positional arguments but 1 was given",
    )
    case("reduce_anything", b"\x80\x02)]\x85R.", [], "REDUCE calls () with (<list of 0>,)")
    case(
        "build_on_tensor",
        _pickle({"w": _Tensor(_Storage("0", 4), (4,), (1,))})[:-2] + b"}b.",
        [small],
        "BUILD sets the state of a _TensorRef",
    )
    case("global", b"\x80\x02cos\nsystem\n.", [], "asks for the global 'os.system'")
    return cases


def test_declared_sizes_and_pickle_tricks(tmp_path: Path) -> None:
    cases = _metadata_cases(tmp_path)
    results = _load_capped([path for path, _ in cases.values()])
    for name, (path, expected) in cases.items():
        outcome, message, seconds = results[str(path)]
        assert outcome == "refused", (name, outcome, message)
        assert expected in message, (name, message)
        assert "\n" not in message and seconds < 1.0, (name, seconds)


# ---------------------------------------------------------------------------------------------
# Mutation fuzzing of a small real checkpoint.


def _small_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=generator)
    return {
        "w": torch.randn(3, 5, generator=generator),
        "b": torch.randn(5, generator=generator).to(torch.bfloat16),
        "n": torch.tensor(7, dtype=torch.int64),
        "t": torch.randn(2, 3, generator=generator).t(),
        "window": base[1:, 2:5],
        "full": base,
        "mask": torch.tensor([True, False, True]),
    }


def _records(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _zip(records: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _mutants(base: bytes, seed: int) -> list[bytes]:
    """Bit flips, truncations, pickle byte edits, dropped, shortened and lengthened storages."""
    rng = np.random.default_rng(seed)
    mutants = []
    for _ in range(150):
        data = bytearray(base)
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        mutants.append(bytes(data))
    mutants += [base[: rng.integers(len(base))] for _ in range(30)]
    records = _records(base)
    pkl_name = next(name for name in records if name.endswith("/data.pkl"))
    pkl = records[pkl_name]
    for _ in range(150):
        edited = bytearray(pkl)
        for _ in range(rng.integers(1, 3)):
            at, edit = int(rng.integers(len(edited))), rng.integers(3)
            if edit == 0:
                edited[at] = rng.integers(256)
            elif edit == 1:
                del edited[at]
            else:
                edited.insert(at, rng.integers(256))
        mutants.append(_zip({**records, pkl_name: bytes(edited)}))
    for name, data in records.items():
        if "/data/" not in name:
            continue
        mutants.append(_zip({k: v for k, v in records.items() if k != name}))
        mutants.append(_zip({**records, name: data[: rng.integers(len(data))]}))
        mutants.append(_zip({**records, name: data + rng.bytes(int(rng.integers(1, 64)))}))
    return mutants


def test_mutation_fuzz(tmp_path: Path) -> None:
    state = _small_state()
    paths = []
    for wrapper in (None, "model"):
        buffer = io.BytesIO()
        torch.save(state if wrapper is None else {wrapper: state, "step": 10}, buffer)
        for i, mutant in enumerate(_mutants(buffer.getvalue(), seed=len(paths))):
            paths.append(tmp_path / f"{wrapper}-{i:03d}.pth")
            paths[-1].write_bytes(mutant)
    assert len(paths) > 600
    results = _load_capped(paths)
    outcomes = collections.Counter(outcome for outcome, _, _ in results.values())
    crashed = {p: d for p, (outcome, d, _) in results.items() if outcome not in ("loaded", "refused")}
    assert not crashed, list(crashed.items())[:5]
    assert outcomes["loaded"] > 20 and outcomes["refused"] > 300, outcomes
    slowest = max(results.values(), key=lambda r: r[2])
    assert slowest[2] < 1.0, slowest
    assert all("\n" not in detail for _, detail, _ in results.values())


# ---------------------------------------------------------------------------------------------
# What still loads, and the expected-shape hook.


def test_deflated_checkpoint_loads(tmp_path: Path) -> None:
    state = _small_state()
    stored = tmp_path / "stored.pth"
    torch.save(state, stored)
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(stored) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as target:
        for name in source.namelist():
            target.writestr(name, source.read(name))
    arrays = load_torch_checkpoint(deflated)
    for name, tensor in state.items():
        expected = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if name == "b" else tensor.numpy()
        assert arrays[name].tobytes() == np.ascontiguousarray(expected).tobytes(), name
        assert arrays[name].flags.owndata, name


def test_check_shapes_runs_before_any_storage_is_read(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(_small_state(), path)
    damaged = _write_zip(
        tmp_path / "damaged.pth",
        [
            _Record(name, data, len(data), crc=zlib.crc32(data) ^ 1 if "/data/" in name else None)
            for name, data in _records(path.read_bytes()).items()
        ],
    )
    seen = {}

    def refuse(shapes):
        seen.update(shapes)
        raise CheckpointError("not this model")

    with pytest.raises(CheckpointError, match="not this model"):
        load_torch_checkpoint(damaged, check_shapes=refuse)
    assert seen["w"] == (3, 5) and seen["window"] == (3, 3) and seen["n"] == ()
    with pytest.raises(CheckpointError, match="CRC-32 does not match"):
        load_torch_checkpoint(damaged, check_shapes=seen.update)


# ---------------------------------------------------------------------------------------------
# Safetensors: the library checks the header and every tensor's size against the file.


def _safetensors(path: Path, header: dict | bytes, data: bytes) -> Path:
    """A safetensors file: the header's length, the header (JSON, or raw bytes as given), the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _safetensors_cases(tmp_path: Path) -> dict[str, Path]:
    f32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    return {
        "header_length": _write(tmp_path / "length.safetensors", struct.pack("<Q", 1 << 62) + b"{}"),
        "huge_shape": _safetensors(tmp_path / "shape.safetensors", {"w": {**f32, "shape": [10**6, 10**6]}}, bytes(16)),
        "huge_offsets": _safetensors(
            tmp_path / "offsets.safetensors", {"w": {**f32, "data_offsets": [0, 4 * 10**12]}}, bytes(16)
        ),
        "huge_header": _safetensors(tmp_path / "header.safetensors", b"{" + b" " * (101 << 20) + b"}", b""),
    }


def test_safetensors_declared_sizes_are_refused_by_the_library(tmp_path: Path) -> None:
    cases = _safetensors_cases(tmp_path)
    good = _safetensors(
        tmp_path / "good.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)
    )
    results = _load_capped([*cases.values(), good], kind="safetensors")
    assert results[str(good)][0] == "loaded"
    for name, path in cases.items():
        outcome, message, seconds = results[str(path)]
        assert outcome == "refused" and seconds < 1.0, (name, outcome, message)


def test_safetensors_refusals_are_checkpoint_errors(tmp_path: Path) -> None:
    from sam_jax.checkpoint import load_state_dict
    from sam_jax.convert.clip import read_safetensors

    for name, path in _safetensors_cases(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_state_dict(path)
        assert str(path) in str(info.value), name
        folder = tmp_path / name
        folder.mkdir()
        os.link(path, folder / "model.safetensors")
        with pytest.raises(CheckpointError):
            read_safetensors(folder)


# ---------------------------------------------------------------------------------------------
# Orbax directories: array shapes and sizes come from metadata, checked before any array is read.


def test_orbax_directory_arrays_beyond_their_bytes(tmp_path: Path, tiny_config, tiny_params) -> None:
    from sam_jax.checkpoint import load_params, save_params

    params = {**tiny_params, "zeros": np.zeros((4096, 8192), np.float32)}  # 128 MiB, a few kB on disk
    path = save_params(tmp_path / "zeros", params, tiny_config)
    with pytest.raises(CheckpointError, match=r"its arrays declare 13\d+ bytes, but it holds \d+ bytes"):
        load_params(path)


def test_orbax_directory_shapes_that_are_not_the_config(tmp_path: Path, tiny_config, tiny_params) -> None:
    from sam_jax.checkpoint import CONFIG_ITEM, load_params, save_params
    from sam_jax.manifest import MANIFEST_FILE, write_manifest

    path = save_params(tmp_path / "ckpt", tiny_params, tiny_config)
    (config_file,) = [f for f in (path / CONFIG_ITEM).iterdir() if f.suffix != ".txt"]
    config = json.loads(config_file.read_text())
    config["image_encoder"]["embed_dim"] *= 2
    config_file.write_text(json.dumps(config))
    (path / MANIFEST_FILE).unlink()
    write_manifest(path)
    with pytest.raises(CheckpointError, match=r"of its params do not match its config \(image_encoder\."):
        load_params(path)

    config_file.write_text(json.dumps({**config, "padding": " " * (2 << 20)}))
    (path / MANIFEST_FILE).unlink()
    write_manifest(path)
    with pytest.raises(CheckpointError, match=r"its 'config' item holds \d+ bytes, more than 1048576"):
        load_params(path)
