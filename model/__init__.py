"""Model side of digitseq: the Flax networks, the train step, metrics, checkpoints, the workdir and model.h5."""
