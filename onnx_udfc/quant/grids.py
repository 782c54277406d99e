"""Weight quantizers (fake-quant) used by UDFC and by the plain round-to-nearest baseline.

Pure NumPy. Every quantizer works per tensor (``axis=None``) or per output channel
(``axis=0``, the first axis of an ONNX Conv/Gemm weight laid out as ``[N, ...]``), computes
in float64 and returns the dequantized array in the input's floating dtype.

Three grids:

* ``paper``: Eq. 3 of UDFC (ICCV 2023) with the ``max|W|`` rescale that the printed formula
  drops: ``2^k`` levels spread evenly over ``[-max|W|, max|W|]``; it has no exact zero and
  cannot be stored as integers with an integer zero point, so it is fake-quant only.
* ``symmetric``: integer grid ``-(2^(b-1)-1) .. 2^(b-1)-1`` (zero included, the most
  negative code unused so the grid is symmetric), ``scale = max|w| / qmax``, zero point 0.
* ``asymmetric``: integer grid ``0 .. 2^b-1`` from the min/max range widened to contain 0,
  integer zero point, so 0.0 is represented exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from onnx_udfc.config import GRANULARITIES, QUANTIZERS


@dataclass(frozen=True)
class QuantResult:
    """A quantized tensor.

    Attributes:
        dequantized: fake-quantized weights, same shape and floating dtype as the input.
        q: integer codes (int8 for symmetric, uint8 for asymmetric); None for the paper grid,
            whose levels are not an integer grid with an integer zero point.
        scale: float64 step size, shape ``()`` per tensor or ``(N,)`` per channel. For the
            integer grids it is strictly positive (1.0 for an all-zero tensor or channel) so it
            can be stored in a ``QuantizeLinear``/``DequantizeLinear``; for the paper grid it is
            the level spacing ``2 max|W| / (2^k - 1)`` (0 for an all-zero tensor).
        zero_point: integer zero point(s) with the dtype of ``q``, same shape as ``scale``;
            None for the paper grid. ``dequantized == (q - zero_point) * scale`` (broadcast on
            ``axis``) up to the final cast to the input dtype.
        axis: None (per tensor) or 0 (per output channel); 1 for block-wise results.
        bits: bit width.
        scheme: ``"paper"``, ``"symmetric"`` or ``"asymmetric"``.
        block_size: None, or the block length along ``axis`` (see
            :func:`quantize_blocks_params`): ``scale`` and ``zero_point`` then have the input's
            shape with that axis divided (rounded up) by ``block_size``, as ONNX's blocked
            ``DequantizeLinear`` expects.
    """

    dequantized: np.ndarray
    q: np.ndarray | None
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None
    bits: int
    scheme: str
    block_size: int | None = None


class QuantizedWeight(NamedTuple):
    """What :func:`~onnx_udfc.methods.compensate.quantize_model`
    quantized for one layer, kept so that
    integer storage (``onnx_udfc.quant.qdq``) writes the quantizer's own codes instead of
    re-deriving them from float weights."""

    weight: str  # initializer name
    out_axis: int  # axis of the ONNX weight that indexes output channels
    result: QuantResult  # codes in the output-channel-first layout the quantizer saw


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return int(bits)


def _prepare(w: np.ndarray, axis: int | None, finite: bool = True
             ) -> tuple[np.ndarray, np.dtype, tuple[int, ...]]:
    """Validate and return (float64 values, output dtype, reduction axes).

    The values are ``w`` itself when it is float64 already (the filters usually are): the
    quantizers never write into them, and a copy of a large layer costs as much as rounding
    it. ``finite=False`` leaves the NaN/inf check to the caller (:func:`_check_finite` on a
    range it computes anyway)."""
    arr = np.asarray(w)
    if axis not in (None, 0):
        raise ValueError(f"axis must be None (per tensor) or 0 (per channel), got {axis!r}")
    if axis == 0 and arr.ndim == 0:
        raise ValueError("per-channel quantization needs an array with at least one axis")
    out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)
    x = np.asarray(arr, dtype=np.float64)
    if finite:
        _check_finite(x)
    red = tuple(range(x.ndim)) if axis is None else tuple(range(1, x.ndim))
    return x, out_dtype, red


def _check_finite(values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError("weights to quantize must be finite (found NaN or inf)")


def _bshape(stat: np.ndarray, x: np.ndarray, axis: int | None) -> np.ndarray:
    """Reshape a per-tensor/per-channel statistic so it broadcasts against ``x``."""
    if axis is None:
        return stat.reshape(())
    return stat.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def _absmax(x: np.ndarray, red: tuple[int, ...]) -> np.ndarray:
    # initial=0 makes empty tensors and channels well-defined (range 0). The larger of max and
    # -min is max|x| without an |x| array; + 0.0 turns a -0.0 (an all-zero range) into 0.0.
    return np.maximum(np.max(x, axis=red, initial=0.0), -np.min(x, axis=red, initial=0.0)) + 0.0


def _storable(scale: np.ndarray, scale_dtype: np.dtype | type | None) -> np.ndarray:
    """``scale`` rounded to the dtype it will be stored in (float64 again for the maths).

    ``DequantizeLinear`` multiplies the integer code by the *stored* scale; when the codes are
    computed with that same scale, ``(q - zp) * scale`` in float64 rounds to exactly the
    float32 product ONNX Runtime computes, so a fake-quantized model and its integer twin hold
    bit-identical weights. A range too small for the dtype falls back to scale 1 (codes 0).
    """
    if scale_dtype is None:
        return scale
    rounded = np.asarray(scale).astype(scale_dtype).astype(np.float64)
    return np.where((rounded > 0) & np.isfinite(rounded), rounded, 1.0)


def paper_quantize_params(w: np.ndarray, bits: int, axis: int | None = None,
                          scale_dtype: np.dtype | type | None = None) -> QuantResult:
    """UDFC Eq. 3 with the ``max|W|`` rescale, as a :class:`QuantResult` (``q`` is None).

    ``scale_dtype`` is accepted for a uniform signature and ignored: nothing is stored.

    ``Wq = M * (2/(2^k-1) * round((2^k-1) * (W/(2M) + 1/2)) - 1)`` with ``M = max|W|`` (per
    tensor as in the paper, or per channel with ``axis=0``). The levels
    ``M * (2n/(2^k-1) - 1)``, ``n = 0..2^k-1``, are symmetric and never 0 because ``2^k-1``
    is odd. An all-zero tensor (or channel) has no range and is returned as zeros.
    """
    k = _check_bits(bits)
    x, out_dtype, red = _prepare(w, axis)
    levels = 2**k - 1
    m = _absmax(x, red)
    mb = _bshape(m, x, axis)
    safe = np.where(mb > 0, mb, 1.0)
    n = np.round(levels * (x / (2.0 * safe) + 0.5))
    deq = np.where(mb > 0, mb * (2.0 / levels * n - 1.0), 0.0)
    return QuantResult(
        deq.astype(out_dtype), None, np.asarray(2.0 * m / levels), None, axis, k, "paper"
    )


def quantize_symmetric_params(w: np.ndarray, bits: int, axis: int | None = None,
                              scale_dtype: np.dtype | type | None = None) -> QuantResult:
    """Symmetric integer grid ``-(2^(b-1)-1)..2^(b-1)-1``, ``scale = max|w| / qmax``
    (rounded to ``scale_dtype`` when given, see :func:`_storable`)."""
    b = _check_bits(bits)
    x, out_dtype, red = _prepare(w, axis, finite=False)
    qmax = 2 ** (b - 1) - 1
    m = _absmax(x, red)
    # max and min propagate NaN, and an inf gives an infinite range: the range is finite
    # exactly when every weight is (one check per channel instead of one per weight)
    _check_finite(m)
    # A zero range would give scale 0; 1.0 keeps codes at 0 and the scale storable.
    scale = _storable(np.where(m > 0, m / qmax, 1.0), scale_dtype)
    sb = _bshape(scale, x, axis)
    steps = np.divide(x, sb)  # a new array (x may be the caller's), rounded in place
    np.round(steps, out=steps)
    # Dividing by a positive scale and rounding are monotone and odd, so round(m / scale) is
    # the largest |code| of each channel: the clip acts only where that exceeds qmax (a scale
    # rounded down to its storage dtype), and is a no-op pass everywhere else.
    if np.any(np.round(m / scale) > qmax):
        np.clip(steps, -qmax, qmax, out=steps)
    q = steps.astype(np.int8)
    # The codes as float64 are ``steps`` itself but for the sign of zero: a code 0 rounded
    # from below holds -0.0 there, which q.astype(np.float64) would not. Adding +0.0 turns
    # -0.0 into +0.0 and keeps every other value, so the product below has the bits of
    # ``q.astype(np.float64) * sb`` without converting the int8 codes back.
    deq = np.add(steps, 0.0, out=steps)
    deq *= sb
    zp = np.zeros(np.shape(scale), dtype=np.int8)
    return QuantResult(deq.astype(out_dtype, copy=False), q, np.asarray(scale), zp, axis, b,
                       "symmetric")


def quantize_asymmetric_params(w: np.ndarray, bits: int, axis: int | None = None,
                               scale_dtype: np.dtype | type | None = None) -> QuantResult:
    """Asymmetric integer grid ``0..2^b-1`` over ``[min(w, 0), max(w, 0)]``, integer zero point
    (scale rounded to ``scale_dtype`` when given, see :func:`_storable`).

    Widening the range to include 0 and rounding the zero point to an integer make
    ``0.0 -> q = zero_point -> 0.0`` exact (padding and ReLU outputs rely on it); the price is
    that the extreme values may be clipped by at most half a step.
    """
    b = _check_bits(bits)
    x, out_dtype, red = _prepare(w, axis)
    qmax = 2**b - 1
    # initial=0 widens the range to contain 0 and handles empty tensors.
    lo = np.min(x, axis=red, initial=0.0)
    hi = np.max(x, axis=red, initial=0.0)
    span = hi - lo
    scale = _storable(np.where(span > 0, span / qmax, 1.0), scale_dtype)
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    sb, zb = _bshape(scale, x, axis), _bshape(zp, x, axis)
    q = np.clip(np.round(x / sb) + zb, 0, qmax)
    deq = (q - zb) * sb
    return QuantResult(
        deq.astype(out_dtype),
        q.astype(np.uint8),
        np.asarray(scale),
        np.asarray(zp).astype(np.uint8),
        axis,
        b,
        "asymmetric",
    )


def paper_quantize(w: np.ndarray, bits: int, axis: int | None = None) -> np.ndarray:
    """Fake-quantize with UDFC Eq. 3 (see :func:`paper_quantize_params`)."""
    return paper_quantize_params(w, bits, axis).dequantized


def quantize_symmetric(w: np.ndarray, bits: int, axis: int | None = None) -> np.ndarray:
    """Fake-quantize on the symmetric integer grid (see :func:`quantize_symmetric_params`)."""
    return quantize_symmetric_params(w, bits, axis).dequantized


def quantize_asymmetric(w: np.ndarray, bits: int, axis: int | None = None) -> np.ndarray:
    """Fake-quantize on the asymmetric integer grid (see :func:`quantize_asymmetric_params`)."""
    return quantize_asymmetric_params(w, bits, axis).dequantized


_PARAMS = {
    "paper": paper_quantize_params,
    "symmetric": quantize_symmetric_params,
    "asymmetric": quantize_asymmetric_params,
}


def quantize_params(
    w: np.ndarray, bits: int, scheme: str = "paper", granularity: str = "tensor",
    scale_dtype: np.dtype | type | None = None,
) -> QuantResult:
    """Dispatch to a quantizer by name.

    Args:
        w: weights ``[N, ...]`` (output channel first).
        bits: 2..8.
        scheme: ``"paper"`` (Eq. 3), ``"symmetric"`` or ``"asymmetric"``.
        granularity: ``"tensor"`` or ``"channel"`` (per output channel, axis 0). The paper
            quantizes per tensor; ``"channel"`` with ``"paper"`` uses ``max|W_i|`` per channel.
        scale_dtype: the dtype scales will be stored in (e.g. ``np.float32``); the integer
            grids round their scales to it first so stored codes reproduce ``dequantized``.
    """
    if scheme not in _PARAMS:
        raise ValueError(f"scheme must be one of {', '.join(QUANTIZERS)}, got {scheme!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}"
        )
    return _PARAMS[scheme](w, bits, None if granularity == "tensor" else 0, scale_dtype)


def quantize_blocks_params(w: np.ndarray, bits: int, scheme: str, block_size: int,
                           scale_dtype: np.dtype | type | None = None) -> QuantResult:
    """Block-wise quantization, the layout of ONNX's blocked ``DequantizeLinear`` (opset 21).

    ``w`` is ``[N, C, ...]`` (output channel first, input channels second, e.g. a Conv weight
    ``[N, C, kh, kw]``). Every run of ``block_size`` consecutive input channels at one
    (output channel, kernel position) gets its own scale (and zero point), so ``scale`` has
    shape ``[N, ceil(C / block_size), ...]``; the last block may be shorter. Padding the last
    block with zeros changes nothing: every grid's range already contains 0.
    """
    if scheme not in _PARAMS:
        raise ValueError(f"scheme must be one of {', '.join(QUANTIZERS)}, got {scheme!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    x = np.asarray(w)
    if x.ndim < 2:
        raise ValueError("block-wise quantization needs an array [N, C, ...]")
    n, c, rest = x.shape[0], x.shape[1], x.shape[2:]
    nb = -(-c // block_size)
    padded = np.pad(x, [(0, 0), (0, nb * block_size - c)] + [(0, 0)] * len(rest))
    # One row per block: [N, nb, B, *rest] -> [N, nb, *rest, B] -> [groups, B].
    rows = np.moveaxis(padded.reshape(n, nb, block_size, *rest), 2, -1).reshape(-1, block_size)
    r = _PARAMS[scheme](rows, bits, 0, scale_dtype)

    def back(a: np.ndarray) -> np.ndarray:
        full = np.moveaxis(a.reshape(n, nb, *rest, block_size), -1, 2)
        return full.reshape(n, nb * block_size, *rest)[:, :c]

    grid = (n, nb, *rest)
    return QuantResult(
        back(r.dequantized),
        None if r.q is None else back(r.q),
        np.asarray(r.scale).reshape(grid),
        None if r.zero_point is None else np.asarray(r.zero_point).reshape(grid),
        1,
        r.bits,
        scheme,
        int(block_size),
    )


def quantize(
    w: np.ndarray, bits: int, scheme: str = "paper", granularity: str = "tensor"
) -> np.ndarray:
    """Fake-quantized weights (see :func:`quantize_params`)."""
    return quantize_params(w, bits, scheme, granularity).dequantized
