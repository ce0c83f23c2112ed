"""Errors raised while reading checkpoints for conversion."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, truncated or not in a supported format.

    The message is one line that names the file and the problem.
    """


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle asks for a global outside the reader's allow-list.

    Raised before the global is resolved, so the code it names never runs.
    """


SHOWN = 4  # how many keys of each kind an error message lists


def check_keys(what: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> None:
    """One CheckpointError naming every kind of key mismatch (up to `SHOWN` keys of each), if any."""
    problems = [
        f"{len(items)} {kind} ({', '.join(items[:SHOWN])}"
        f"{f', ... ({len(items) - SHOWN} more)' if len(items) > SHOWN else ''})"
        for kind, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if items
    ]
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value
