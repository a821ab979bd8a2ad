"""Target schedules and tensor intrinsics for tvmquant's integer kernels (``tvmquant.schedules``).

- :mod:`.pipeline`: the build pipeline (dispatch to tensorized kernels, fusion, tuned records,
  default schedules, TVM's lowering) behind :func:`tvmquant.build`.
- :mod:`.cpu`: default schedules for any LLVM CPU (DLight-style rules, one per kernel kind).
- :mod:`.x86`: AVX-512 VNNI kernels (int8 dense/conv2d with fused requantization, sub-byte
  weight GEMV), bit-serial popcount kernels, and the graph dispatch onto them.
"""
