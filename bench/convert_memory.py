"""`python -m bench.convert_memory`: peak memory of converting an official checkpoint, against its tensor bytes.

Writes a random-weight official checkpoint with torch (`bench.official.build_official` of the
sam-jax config, `randomize_`, `torch.save` of its state dict; in a child process), then runs three
child processes and reads each one's peak resident memory (`ru_maxrss`, from `os.wait4`):

* imports: the converter's imports alone (Python, JAX, orbax), the floor of any conversion;
* reader: `load_torch_checkpoint` alone, imported without `sam_jax` (numpy and ml_dtypes only);
* load: `sam_jax.load_model(SRC)`, the checkpoint read, converted and placed on the device;
* convert: `sam-jax convert` (`python -m sam_jax.cli convert SRC DST`), the whole conversion,
  which also writes the orbax directory (orbax holds a host copy of every array while it saves).

Prints the tensor bytes, each peak, and peak / tensor bytes, also net of the imports. Not a timed test.
A child's `ru_maxrss` starts at its parent's resident size when it is forked, so this process
imports neither torch nor JAX.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_READER_CHILD = r"""
import sys, types
package = types.ModuleType("standalone_reader")
package.__path__ = [sys.argv[1]]
sys.modules["standalone_reader"] = package
from standalone_reader.torch_pickle import load_torch_checkpoint
arrays = load_torch_checkpoint(sys.argv[2])
assert "jax" not in sys.modules and "torch" not in sys.modules
print(sum(a.nbytes for a in arrays.values()))
"""
_WRITER_CHILD = "import sys; from bench.convert_memory import write_checkpoint; print(write_checkpoint(*sys.argv[1:]))"
_LOAD_CHILD = "import sys, sam_jax; sam_jax.load_model(sys.argv[1])"
_IMPORTS_CHILD = "import jax, orbax.checkpoint, sam_jax.checkpoint, sam_jax.cli, sam_jax.convert.state_dict"


def write_checkpoint(model: str, path: str | Path, seed: int = 0) -> int:
    """torch.save a random-weight official `model` to `path`; returns its tensor bytes."""
    import torch

    from bench.official import build_official, randomize_
    from sam_jax.config import get_config

    sam = randomize_(build_official(get_config(model)), seed=seed)
    state = sam.state_dict()
    torch.save(state, path)
    return sum(t.numel() * t.element_size() for t in state.values())


def peak_rss(argv: list[str]) -> tuple[int, str]:
    """(peak RSS in bytes, stdout) of running `argv` as a child process, which must succeed."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(argv, stdout=out, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if child.returncode:
        raise RuntimeError(f"{argv[:4]} exited with {child.returncode}")
    return usage.ru_maxrss * 1024, text  # Linux reports kilobytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", help="official variant to write and convert (default vit_b)")
    args = parser.parse_args(argv)
    reader_folder = str(Path(__file__).resolve().parents[1] / "convert")
    with tempfile.TemporaryDirectory() as work:
        src, dst = Path(work) / f"sam_{args.model}.pth", Path(work) / "converted"
        tensor_bytes = int(peak_rss([sys.executable, "-c", _WRITER_CHILD, args.model, str(src)])[1])
        imports, _ = peak_rss([sys.executable, "-c", _IMPORTS_CHILD])
        reader, read_bytes = peak_rss([sys.executable, "-c", _READER_CHILD, reader_folder, str(src)])
        assert int(read_bytes) == tensor_bytes, (read_bytes, tensor_bytes)
        load, _ = peak_rss([sys.executable, "-c", _LOAD_CHILD, str(src)])
        convert, _ = peak_rss([sys.executable, "-m", "sam_jax.cli", "convert", str(src), str(dst)])
    mib = 1 << 20
    print(f"{args.model}: tensor bytes {tensor_bytes} ({tensor_bytes / mib:.1f} MiB)")
    rows = (("imports", imports, 0), ("reader", reader, 0), ("load", load, imports), ("convert", convert, imports))
    for name, peak, floor in rows:
        net = f", net of imports {(peak - floor) / mib:.0f} MiB = {(peak - floor) / tensor_bytes:.2f}x" if floor else ""
        print(f"  {name:8s} peak RSS {peak / mib:7.0f} MiB = {peak / tensor_bytes:.2f}x tensor bytes{net}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
