"""Training, installed as `sam_jax.train`: data (SA-1B, synthetic shapes), prompt simulation, losses, optimizer,
sharding, the train step and loop, evaluation, text prompts, encoder pretraining and the data engine."""
