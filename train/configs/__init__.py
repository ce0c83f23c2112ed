"""Training recipes as ml_collections config files (`sam-jax train --config train/configs/NAME.py`)."""
