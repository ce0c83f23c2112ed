"""Tests for sam_jax.convert.torch_pickle: torch-free reading of `torch.save` checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from sam_jax.convert.errors import CheckpointError, UnsafeCheckpointError
from sam_jax.convert.torch_pickle import load_torch_checkpoint


def _realistic_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    state = dict(module.state_dict())  # includes a 0-dim int64 (num_batches_tracked)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state.update(
        {
            "half": torch.randn(2, 3).half(),
            "bf16": torch.randn(5).to(torch.bfloat16),
            "bf16_scalar": torch.tensor(1.5, dtype=torch.bfloat16),
            "int64": torch.arange(-3, 3, dtype=torch.int64),
            "mask": torch.tensor([[True, False], [False, True]]),
            "scalar": torch.tensor(2.25),
            "transposed": torch.randn(3, 5).t(),
            "shared_full": base,
            "shared_window": base[1:, 2:5],  # offset 8, non-contiguous rows
            "shared_flat": base.view(-1)[5:9],
            "expanded": torch.ones(1, 3).expand(4, 3),  # stride 0
            "empty": torch.zeros(0, 3),
            "param": torch.nn.Parameter(torch.randn(2, 2)),
        }
    )
    return state


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _assert_matches(arrays: dict[str, np.ndarray], state: dict[str, torch.Tensor]) -> None:
    assert list(arrays) == list(state)
    for name, tensor in state.items():
        expected = _numpy(tensor)
        array = arrays[name]
        assert isinstance(array, np.ndarray), name
        assert array.dtype == expected.dtype, name
        assert array.shape == expected.shape, name
        assert array.flags.owndata and array.flags.writeable, name
        assert array.tobytes() == expected.tobytes(), name  # bit-exact, in C order


def _load_error(path: Path, error: type[CheckpointError] = CheckpointError) -> str:
    with pytest.raises(error) as info:
        load_torch_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def _rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Copy zip `src` to `dst`, passing each record through `edit` (None drops it)."""
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(dst, "w") as target:
        for name in source.namelist():
            data = edit(name, source.read(name))
            if data is not None:
                target.writestr(name, data)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return _realistic_state_dict()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save(state, path)
    return path


def test_round_trip_matches_torch(checkpoint: Path, state: dict[str, torch.Tensor]) -> None:
    arrays = load_torch_checkpoint(checkpoint)
    _assert_matches(arrays, state)
    assert arrays["bf16"].dtype == ml_dtypes.bfloat16
    assert arrays["scalar"].shape == () and arrays["scalar"] == np.float32(2.25)
    assert not np.shares_memory(arrays["shared_full"], arrays["shared_window"])
    assert load_torch_checkpoint(str(checkpoint)).keys() == arrays.keys()


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_wrapped_state_dict(tmp_path: Path, state: dict[str, torch.Tensor], wrapper: str) -> None:
    path = tmp_path / "train.pth"
    torch.save({"epoch": 3, "name": "run", wrapper: state, "extra": torch.ones(2)}, path)
    _assert_matches(load_torch_checkpoint(path), state)


def test_flat_dict_with_non_tensor_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pth"
    torch.save({"w": torch.ones(2), "step": 3}, path)
    assert "entry 'step' is a int, not a tensor" in _load_error(path)


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "evil": _RunsShell(f"touch {marker}")}, path)
    message = _load_error(path, UnsafeCheckpointError)
    assert f"'{os.system.__module__}.system'" in message
    assert not marker.exists()


def test_truncated_file(tmp_path: Path, checkpoint: Path) -> None:
    data = checkpoint.read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(data[: len(data) // 2])
    assert "is truncated" in _load_error(path)


@pytest.mark.parametrize("content", [b"this is a text file, not a checkpoint\n", np.random.default_rng(0).bytes(4096)])
def test_not_a_zip(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    assert "is not a PyTorch zip checkpoint" in _load_error(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    assert "is empty" in _load_error(path)


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in _load_error(tmp_path / "absent.pth")


def test_legacy_format(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert "legacy (pre-1.6) PyTorch format" in _load_error(path)


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("stuff/readme.txt", "hello")
    assert "data.pkl" in _load_error(path)


def test_missing_storage_record(tmp_path: Path, checkpoint: Path) -> None:
    path = tmp_path / "no_storage.pth"
    _rewrite(checkpoint, path, lambda name, data: None if name == "model/data/0" else data)
    assert "is truncated: storage 'model/data/0' is missing" in _load_error(path)


def test_storage_shorter_than_tensor(tmp_path: Path, checkpoint: Path) -> None:
    path = tmp_path / "short_storage.pth"
    _rewrite(checkpoint, path, lambda name, data: data[:4] if name == "model/data/0" else data)
    assert "is truncated: storage 'model/data/0' holds 4 bytes, but the pickle declares" in _load_error(path)


def test_big_endian_storages(tmp_path: Path) -> None:
    state = {"a": torch.randn(3, 2), "b": torch.randn(4).t(), "c": torch.tensor(-1.0)}
    little = tmp_path / "little.pth"
    torch.save(state, little)

    def to_big(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, "<f4").astype(">f4").tobytes()
        return data

    big = tmp_path / "big.pth"
    _rewrite(little, big, to_big)
    _assert_matches(load_torch_checkpoint(big), state)


def test_loading_does_not_import_torch(checkpoint: Path) -> None:
    script = (
        "import sys\n"
        "from sam_jax.convert.torch_pickle import load_torch_checkpoint\n"
        f"arrays = load_torch_checkpoint({str(checkpoint)!r})\n"
        "assert arrays and 'torch' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
