"""Friendly target names for x86 CPUs (and any TVM target dict)."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
from collections.abc import Mapping

import tvm

# Friendly name -> LLVM target fields. mcpu picks the instruction set the kernels may use.
TARGETS: dict[str, dict] = {
    "x86-vnni": {"kind": "llvm", "mcpu": "cascadelake"},  # AVX-512 VNNI
    "x86-amx": {"kind": "llvm", "mcpu": "sapphirerapids"},  # AVX-512 VNNI + AMX-INT8
    "x86-avx512": {"kind": "llvm", "mcpu": "skylake-avx512"},
    "x86-avx2": {"kind": "llvm", "mcpu": "haswell"},
    "llvm": {"kind": "llvm"},  # generic x86-64, no extensions assumed
}


def host_target() -> dict:
    """The LLVM target of this machine's CPU."""
    cpu = tvm.target.codegen.llvm_get_system_cpu() if hasattr(tvm.target, "codegen") else None
    fields = {"kind": "llvm"}
    if cpu and cpu != "generic":
        fields["mcpu"] = str(cpu)
    return fields


def resolve_target(target: str | Mapping | tvm.target.Target,
                   num_cores: int | None = None) -> tvm.target.Target:
    """Turn a friendly name, a JSON/dict target, or a Target into a ``tvm.target.Target``.

    Friendly names: ``x86-vnni``, ``x86-amx``, ``x86-avx512``, ``x86-avx2``, ``llvm``,
    ``native`` (this machine's CPU).
    """
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        text = target.strip()
        if text.startswith("{"):
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"target {text!r} is not valid JSON: {err}") from None
        elif text in ("native", "host"):
            fields = host_target()
        elif text in TARGETS:
            fields = dict(TARGETS[text])
        else:
            raise ValueError(
                f"unknown target {text!r}; use one of {', '.join([*TARGETS, 'native'])} "
                "or a TVM target dict such as '{\"kind\": \"llvm\", \"mcpu\": \"znver4\"}'"
            )
    elif isinstance(target, Mapping):
        fields = dict(target)
    else:
        raise TypeError(f"target must be a name, a dict or a Target, not {type(target).__name__}")
    if fields.get("kind") == "llvm":
        fields.setdefault("num-cores", num_cores or os.cpu_count() or 1)
    try:
        return tvm.target.Target(fields)
    except Exception as err:  # TVM raises its own error types
        raise ValueError(f"invalid target {fields}: {err}") from None


#: The CPU features (LLVM names) whose instructions tvmquant's kernels or LLVM's vectorizer
#: may emit: a module built for a target with one of them does not run on a CPU without it.
VECTOR_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512vbmi",
                   "avx512vpopcntdq", "avx512bf16", "avx512fp16", "avxvnni", "amx-tile",
                   "amx-int8", "amx-bf16")


def missing_host_features(target: tvm.target.Target) -> list[str]:
    """The features of :data:`VECTOR_FEATURES` that an x86 LLVM ``target`` enables and this
    machine's CPU lacks (empty: what is built for ``target`` runs here)."""
    if target.kind.name != "llvm":
        return []
    try:
        has = tvm.target.codegen.llvm_cpu_has_features
        host = tvm.target.Target(host_target())
        return [f for f in VECTOR_FEATURES if has([f], target) and not has([f], host)]
    except Exception:  # another architecture, an LLVM without these names: no claim
        return []


# ---------------------------------------------------------------------------------------------
# AMX: the operating system's side
# ---------------------------------------------------------------------------------------------
_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = \
    158, 0x1022, 0x1023, 18


def cpu_has_amx() -> bool:
    """Whether this machine's CPU reports AMX-INT8 (``/proc/cpuinfo``'s ``amx_int8``)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


@functools.cache
def request_amx_permission() -> bool:
    """Ask Linux for the AMX tile state for this process, once; every thread, present and
    future, gets it. A process must do this before its first tile instruction, or the
    kernel stops it with ``SIGILL``: tvmquant does it where it builds or runs modules (its
    kernels package on import, :func:`tvmquant.run`, ``tvmquant run``). True when granted;
    False on other systems or CPUs."""
    if not sys.platform.startswith("linux") or not cpu_has_amx():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
            return False
        mask = ctypes.c_uint64(0)
        libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask))
        return bool(mask.value & (1 << _XFEATURE_XTILEDATA))
    except (OSError, AttributeError):
        return False
