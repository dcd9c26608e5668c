"""Counter-based random numbers for the pipeline: every number is a hash of integer words.

A batch built from hashes of (seed, step, example, slot) is a pure function of those words: the
same on any machine, for any sharding, after any resume.
"""

from __future__ import annotations

import tensorflow as tf


def _mix(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit finalizer with full avalanche (lowbias32): neighbouring inputs, unrelated outputs."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(15, tf.uint32)))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def hash_words(*words: tf.Tensor | int) -> tf.Tensor:
    """Hashes integer words (broadcast together) to uint32."""
    h = tf.constant(0x9E3779B9, tf.uint32)
    for word in words:
        word = tf.cast(word, tf.int64)
        for half in (word, tf.bitwise.right_shift(word, tf.constant(32, tf.int64))):
            h = _mix(tf.bitwise.bitwise_xor(h, tf.cast(tf.bitwise.bitwise_and(half, 0xFFFFFFFF), tf.uint32)))
    return h


def below(bits: tf.Tensor, n: int | tf.Tensor) -> tf.Tensor:
    """Maps uniform uint32 to a uniform int32 in [0, n) (multiply-shift: no modulo bias to speak of)."""
    wide = tf.cast(bits, tf.uint64) * tf.cast(n, tf.uint64)
    return tf.cast(tf.bitwise.right_shift(wide, tf.constant(32, tf.uint64)), tf.int32)


def uniform(bits: tf.Tensor, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
    """Maps uniform uint32 to a uniform float32 in [low, high) (24 bits of it: exact in float32)."""
    unit = tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), tf.float32) * (1.0 / (1 << 24))
    return low + (high - low) * unit
