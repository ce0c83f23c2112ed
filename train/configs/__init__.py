"""Training recipes as ml_collections config files: `sam-jax train --config NAME` (a recipe here,
e.g. `shapes_p8`) or `--config path/to/file.py` (any file with a `get_config()`)."""
