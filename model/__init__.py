"""Model side of digitseq: the Flax networks, metrics and model.h5 I/O (arriving with issue #3)."""
