"""Block quantization of what the collectives move (ZeRO++'s qwZ and qgZ).

A 1-D float tensor is cut into blocks of `block_size` elements (the last one
zero-padded); each block travels as symmetric integers of `bits` bits (int8:
-127..127, int4: -7..7, two per byte) and one float32 scale, `max|x| / qmax`,
so that every element comes back within half a scale of its value. A block
holding a NaN or an infinity travels with a NaN scale: everything
dequantized from it is NaN, so a loss scale's overflow check still sees it.

Collectives have no int8 kernels (and the CPU ones no bfloat16), so codes
and scales are laid end to end and move as the bits of a float16 tensor, no
arithmetic on the way: `pack` / `unpack`. `tf_zero.collectives` uses them
for `quantized_all_gather` and `quantized_reduce_scatter`. See
docs/quantized-collectives.md.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tf_zero.config import BlockQuantization

__all__ = ["BlockQuantization", "quantize", "dequantize", "pack", "unpack"]

def quantize(x: tf.Tensor, q: BlockQuantization) -> tuple[tf.Tensor, tf.Tensor]:
    """Block codes and scales of the rows of `x`.

    Args:
        x: float tensor of shape `[length]` or `[rows, length]`.
        q: the format.

    Returns:
        `(codes, scales)`: int8 codes of shape `[rows, blocks, block_size]`
        (rows omitted for 1-D input) and float32 scales `[rows, blocks]`.
    """
    one_d = x.shape.rank == 1
    x = tf.cast(x[tf.newaxis] if one_d else x, tf.float32)
    length = x.shape[1]
    blocks = q.num_blocks(length)
    x = tf.pad(x, [[0, 0], [0, blocks * q.block_size - length]])
    x = tf.reshape(x, [-1, blocks, q.block_size])
    amax = tf.reduce_max(tf.abs(x), axis=-1)
    finite = tf.reduce_all(tf.math.is_finite(x), axis=-1)
    scales = tf.where(finite, amax / q.qmax, tf.constant(math.nan, tf.float32))
    safe = tf.where(finite & (scales > 0), scales, 1.0)[..., tf.newaxis]
    values = tf.where(tf.math.is_finite(x), x, 0.0) / safe
    codes = tf.cast(tf.clip_by_value(tf.round(values), -q.qmax, q.qmax), tf.int8)
    if one_d:
        return codes[0], scales[0]
    return codes, scales


def dequantize(codes: tf.Tensor, scales: tf.Tensor, length: int,
               dtype=tf.float32) -> tf.Tensor:
    """The first `length` elements of each row that `quantize` coded, in `dtype`
    (products in float32)."""
    values = tf.cast(codes, tf.float32) * scales[..., tf.newaxis]
    shape = tf.concat([tf.shape(scales)[:-1], [-1]], 0)
    values = tf.reshape(values, shape)[..., :length]
    return tf.cast(values, dtype)


def _pack_nibbles(codes: tf.Tensor) -> tf.Tensor:
    """int4 codes (-7..7, as int8) two per byte: low nibble first."""
    biased = tf.cast(codes + 8, tf.uint8)  # 1..15
    pairs = tf.reshape(biased, tf.concat([tf.shape(biased)[:-1], [-1, 2]], 0))
    return tf.bitwise.bitwise_or(pairs[..., 0],
                                 tf.bitwise.left_shift(pairs[..., 1], tf.constant(4, tf.uint8)))


def _unpack_nibbles(packed: tf.Tensor) -> tf.Tensor:
    low = tf.bitwise.bitwise_and(packed, tf.constant(15, tf.uint8))
    high = tf.bitwise.right_shift(packed, tf.constant(4, tf.uint8))
    pairs = tf.stack([low, high], axis=-1)
    codes = tf.cast(pairs, tf.int8) - 8
    return tf.reshape(codes, tf.concat([tf.shape(packed)[:-1], [-1]], 0))


def pack(codes: tf.Tensor, scales: tf.Tensor, q: BlockQuantization) -> tf.Tensor:
    """Codes and scales as float16 bits: `[rows, wire_length]` (or `[wire_length]`).

    The float16 values are meaningless; only the collective's byte copies
    touch them.
    """
    one_d = scales.shape.rank == 1
    if one_d:
        codes, scales = codes[tf.newaxis], scales[tf.newaxis]
    rows = tf.shape(scales)[0]
    code_bytes = tf.reshape(codes, [rows, -1])
    if q.bits == 4:
        code_bytes = _pack_nibbles(code_bytes)
    code_bytes = tf.bitcast(code_bytes, tf.uint8) if code_bytes.dtype == tf.int8 else code_bytes
    scale_bytes = tf.reshape(tf.bitcast(scales, tf.uint8), [rows, -1])
    wire = tf.concat([code_bytes, scale_bytes], axis=1)
    wire = tf.bitcast(tf.reshape(wire, [rows, -1, 2]), tf.float16)
    return wire[0] if one_d else wire


def unpack(wire: tf.Tensor, length: int, q: BlockQuantization) -> tuple[tf.Tensor, tf.Tensor]:
    """`pack`'s inverse for rows of `length` elements: `(codes, scales)` of
    shape `[rows, blocks, block_size]` and `[rows, blocks]`."""
    blocks = q.num_blocks(length)
    rows = tf.shape(wire)[0]
    raw = tf.reshape(tf.bitcast(wire, tf.uint8), [rows, -1])
    code_bytes, scale_bytes = raw[:, :q.code_bytes(length)], raw[:, q.code_bytes(length):]
    if q.bits == 4:
        codes = _unpack_nibbles(code_bytes)
    else:
        codes = tf.bitcast(code_bytes, tf.int8)
    codes = tf.reshape(codes, [rows, blocks, q.block_size])
    scales = tf.bitcast(tf.reshape(scale_bytes, [rows, blocks, 4]), tf.float32)
    return codes, scales
