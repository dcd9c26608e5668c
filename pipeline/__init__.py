"""Input side of digitseq: MNIST through TFDS and stitched digit-sequence batches in tf.data.

TensorFlow only feeds data here, so it is imported once, quietly, with every accelerator hidden
from it: the GPUs and TPUs belong to JAX.
"""

import ctypes
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# On CPUs with AVX-512 TensorFlow turns on oneDNN by default, and then says so on stderr through
# absl, which TF_CPP_MIN_LOG_LEVEL does not silence. The pipeline's ops (integer stitching, the
# bilinear resize) gain nothing from it, and with it off they round alike on every CPU type.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# TensorFlow's import loads Keras's optimizers (and with Keras, scikit-learn where it is installed) only
# to register them for SavedModels that hold them: a second of every command's start, a third of the
# import. Nothing here loads such a model; whatever uses Keras imports it itself. A None in sys.modules
# makes that one import fail at once, which TensorFlow expects and passes over; it is removed after.
_SKIPPED = "keras.src.optimizers"
_skipping = sys.modules.setdefault(_SKIPPED, None) is None
try:
    import tensorflow as tf  # noqa: E402
finally:  # (however the import ends: Keras stays importable)
    if _skipping:
        del sys.modules[_SKIPPED]

for _kind in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):  # no such devices, or TF already initialised them
        pass

# Parallelism comes from tf.data running whole batches side by side (its own thread pool, sized
# by `threads`); TF's op-level pools would only add threads that compete with them and with JAX.
try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:  # TF was initialised before this package was imported
    pass


def _keep_freed_buffers() -> None:
    # Every tf.data element is a fresh buffer of a few MB. By default glibc maps each one anew
    # and hands it back on free, so every element pays page faults and zeroing (a fifth of the
    # pipeline's CPU time here). Serving them from the heap and not trimming it keeps them warm.
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 1 << 30)


_keep_freed_buffers()
