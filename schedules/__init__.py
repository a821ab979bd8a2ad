"""Target schedules and tensor intrinsics for tvmquant's integer kernels (``tvmquant.schedules``).

Empty for now: the integer-only graphs build with TVM's default (untuned) kernels. The x86
VNNI/AMX rules, one per kernel, arrive with the "fast integer kernels on x86" issue.
"""
