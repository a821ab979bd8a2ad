"""x86 integer kernels: AVX-512 VNNI (``vpdpbusd``) tensor intrinsics and scheduled TIR.

- :mod:`.vnni_intrin`: ``tvmquant_dot_16x4_vnni``, its pixel-lane and window variants, and
  ``tvmquant_dot_8x4_avx2_exact``
  (registered on import, under tvmquant's own names).
- :mod:`.int8_dense`: ``C[M, N] = A[M, K] (u8) . W (s8, packed N/16 x K/4 x 16 x 4)`` with an
  optional fused bias + dyadic requantization epilogue (uint8, int8 or int16 output).
- :mod:`.int8_conv2d`: direct conv2d (u8 NCHW / NCHW4c / NCHW16c input, s8 packed OIHW
  weight, NCHW or NCHW16c output), same epilogue; 16 output channels on the lanes (or 2 x 8
  with the exact AVX2 blocks, ``isa="avx2"``).
- :mod:`.int8_conv2d_pixels`: stride-1 conv2d with 16 output *pixels* on the lanes (no
  channel padding, no transpose): the layers with few output channels on wide rows.
- :mod:`.int8_conv2d_amx`: stride-1 conv2d on AMX-INT8 tiles (``tdpbsud``: 16 pixels x 64
  channels x 16 output channels per instruction), for CPUs that have AMX;
  :mod:`.int8_dense_amx` the matmul on them (``tdpbusd``); :mod:`.amx_intrin` holds their
  intrinsics and :mod:`.amx_emulator` the NumPy model of the AMX instructions that runs them
  on other CPUs.
- :mod:`.int8_depthwise_conv2d`: depthwise conv2d (u8 NCHW, s8 ``[C, KH, KW/4, 4]``), 4
  kernel columns per ``vpdpbusd`` from byte-shuffled windows of the input row, same
  epilogue.
- :mod:`.subbyte_gemv`: batch-1 (few-row) matmul with 8/4/2-bit weights packed 1/2/4 per
  byte, unpacked in registers.
- :mod:`.bitserial_dense`: binary (XNOR), ternary and few-bit unipolar dense on vector
  popcount (``vpopcntq``; NEON ``cnt`` when cross-compiled for ARM), and the run-time
  packing kernels of bit-serial matmuls and convolutions (NHWC with ``vpmovmskb``, or
  portable im2col).
- :mod:`.dispatch`: the Relax pass that puts the int8 kernels into integer-only graphs.
- :mod:`.dispatch_subbyte`: the Relax pass that puts few-bit layers on the bit-serial and
  sub-byte GEMV kernels.

Every kernel is checked bit-exact against NumPy in ``tests/schedules/``.
"""

from ...targets import request_amx_permission
from . import vnni_intrin  # noqa: F401  (registers the intrinsics)

# the AMX kernels run in this process's threads: ask Linux for the tile state once, here
# (a no-op on CPUs without AMX)
request_amx_permission()
