"""x86 integer kernels: AVX-512 VNNI (``vpdpbusd``) tensor intrinsics and scheduled TIR.

- :mod:`.vnni_intrin`: ``tvmquant_dot_16x4_vnni`` and ``tvmquant_dot_8x4_avx2_exact``
  (registered on import, under tvmquant's own names).
- :mod:`.int8_dense`: ``C[M, N] = A[M, K] (u8) . W (s8, packed N/16 x K/4 x 16 x 4)`` with an
  optional fused bias + dyadic requantization epilogue.
- :mod:`.int8_conv2d`: direct conv2d (u8 NCHW / NCHW4c / NCHW16c input, s8 packed OIHW
  weight, NCHW or NCHW16c output), same epilogue.

Every kernel is checked bit-exact against int64 NumPy in ``tests/schedules/test_x86_int8.py``.
"""

from . import vnni_intrin  # noqa: F401  (registers the intrinsics)
