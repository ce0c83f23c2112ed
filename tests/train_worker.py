"""Training runs that need a process of their own (simulated devices, SIGKILL, several
processes), started by tests/test_train.py as `python -m tests.train_worker MODE ...`.

Each mode prints one JSON line prefixed with RESULT: on success.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys


def small_config(data_dir: str, **overrides):
    """The shapes recipe shrunk to seconds a step: batch 8, 2 masks, one correction point."""
    from sam_jax.train.trainer import load_config_file

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config_file(os.path.join(here, "train", "configs", "shapes_tiny.py"))
    cfg.data.train_dir = data_dir
    cfg.batch_size = 8
    cfg.data.masks_per_image = 2
    cfg.loss.num_point_iters = 1
    cfg.loss.num_no_point_iters = 1
    cfg.optim.warmup_steps = 2
    cfg.log_every = 1
    cfg.checkpoint.every = 2
    cfg.checkpoint.keep = 10
    return set_keys(cfg, overrides)


def set_keys(cfg, overrides: dict):
    """cfg with each dotted key ("loss.text_prob") of `overrides` set to its value."""
    for k, v in overrides.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def flat_params(params) -> dict:
    """params -> {(module, ..., name): numpy array}."""
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {tuple(k.key for k in path): np.asarray(v) for path, v in leaves}


def _params_digest(params) -> dict:
    """params -> {"['module']...['name']": numpy array} (JSON-friendly keys)."""
    return {"".join(f"[{k!r}]" for k in path): v for path, v in flat_params(params).items()}


def param_diffs(ref: dict, got: dict) -> dict[str, float]:
    """Max abs difference per param (digests of `_params_digest`), attention key biases left out:
    they get no gradient in exact arithmetic (softmax ignores a shift of all keys), so Adam turns
    their rounding noise, different for another summation order, into steps of the size of
    the learning rate. Everything else must match."""
    import numpy as np

    diff = {}
    for name, a in ref.items():
        b = got[name]
        if name.endswith("['k_proj']['bias']"):
            continue
        if name.endswith("['qkv']['bias']"):  # (3 * C,): q, k, v
            a, b = np.delete(a.reshape(3, -1), 1, 0), np.delete(b.reshape(3, -1), 1, 0)
        diff[name] = float(np.max(np.abs(a - b)))
    return diff


def meshes(data_dir: str, workdir: str, steps: int) -> None:
    """The same steps on 1x1, 4x2 and 8x1 (data x fsdp) meshes of 8 CPU devices."""
    import jax

    from sam_jax.train.sharding import make_mesh
    from sam_jax.train.trainer import Trainer

    assert jax.device_count() == 8, jax.devices()
    results = {}
    for data, fsdp in ((1, 1), (4, 2), (8, 1)):
        mesh = make_mesh(data, fsdp, devices=jax.devices()[: data * fsdp])
        tr = Trainer(small_config(data_dir), os.path.join(workdir, f"{data}x{fsdp}"), mesh=mesh, quiet=True)
        losses = [float(tr.run_step()["loss"]) for _ in range(steps)]
        # The params really are sharded along fsdp (the embedding dim of the patch projection).
        kernel = tr.state.params["image_encoder"]["patch_embed"]["proj"]["kernel"]
        shards = {s.data.shape for s in kernel.addressable_shards}
        # The collectives XLA's SPMD partitioner put in the compiled step (after the steps above:
        # the extra batch changes nothing they compared); an async one counts by its -start op.
        hlo = tr._step.lower(tr.state, tr._next_batch()).compile().as_text()
        ops = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
        collectives = {op: len(re.findall(rf" {op}(?:-start)?\(", hlo)) for op in ops}
        results[f"{data}x{fsdp}"] = (losses, _params_digest(tr.state.params), sorted(shards), collectives)
        tr.close()
    ref_losses, ref_params, *_ = results["1x1"]
    out = {"losses": {k: v[0] for k, v in results.items()}, "shards": {k: v[2] for k, v in results.items()}}
    out["collectives"] = {k: v[3] for k, v in results.items()}
    out["max_param_diff"] = {k: max(param_diffs(ref_params, v[1]).values()) for k, v in results.items()}
    print("RESULT:" + json.dumps(out), flush=True)


def run(data_dir: str, workdir: str, steps: int, kill_at: int = -1) -> None:
    """Train to `steps` (resuming from workdir); with kill_at, SIGKILL this process after that step."""
    from sam_jax.train.trainer import Trainer

    tr = Trainer(small_config(data_dir), workdir, quiet=False)

    def callback(step: int) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    tr.train(steps, callback=callback)
    tr.close()
    print("RESULT:" + json.dumps({"resumed_from": tr.resumed_from, "step": tr.step}), flush=True)


def layouts(
    data_dir: str,
    workdir: str,
    plan: str,
    coordinator: str | None = None,
    num: int | None = None,
    pid: int | None = None,
) -> None:
    """Train on 4 devices, however many processes hold them (with COORDINATOR NUM PID: as
    process PID of NUM), into one workdir, following `plan` "MESH:STEP,...": train on MESH
    up to STEP, then resume from that checkpoint on the next MESH. Meshes (data x fsdp):
    "4x1", and "2x2" whose fsdp pairs span the processes (devices 0, 2 | 1, 3)."""
    from sam_jax.train.sharding import initialize_distributed, make_mesh

    initialize_distributed(coordinator, num, pid, timeout_s=120)
    import jax

    from sam_jax.train.trainer import Trainer

    assert jax.device_count() == 4, jax.devices()
    d = jax.devices()
    meshes = {"4x1": make_mesh(4, 1), "2x2": make_mesh(2, 2, devices=[d[0], d[2], d[1], d[3]])}
    out = {"process": jax.process_index(), "processes": jax.process_count(), "resumed_from": [], "shards": []}
    for item in plan.split(","):
        name, stop = item.split(":")
        tr = Trainer(small_config(data_dir), workdir, mesh=meshes[name], quiet=True)
        tr.train(int(stop))
        tr.close()
        kernel = tr.state.params["image_encoder"]["patch_embed"]["proj"]["kernel"]
        out["shards"].append(sorted({s.data.shape for s in kernel.addressable_shards}))
        out["resumed_from"].append(tr.resumed_from)
    print("RESULT:" + json.dumps(out), flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "meshes":
        meshes(args[0], args[1], int(args[2]))
    elif mode == "run":
        run(args[0], args[1], int(args[2]), int(args[3]) if len(args) > 3 else -1)
    elif mode == "layouts":
        layouts(args[0], args[1], args[2], *(args[3:4] + [int(a) for a in args[4:6]]))
    else:
        raise SystemExit(f"unknown mode {mode}")
