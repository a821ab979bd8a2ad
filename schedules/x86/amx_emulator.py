"""A NumPy model of the AMX-INT8 instructions that :mod:`.amx_intrin` emits, for CPUs without AMX.

:mod:`.amx_intrin` builds each kernel in one of two back ends from the same loop nest:

- ``"amx"``: LLVM's AMX intrinsics (``ldtilecfg``, ``tileloadd``, ``tdpbsud``,
  ``tdpbusd``, ``tilestored``, ``tilerelease``), for CPUs with AMX-INT8 (Sapphire Rapids and later);
- ``"emulate"``: each of those instructions becomes a packed-function call, with the very
  same arguments (tile number, pointer, stride in bytes), into the model below.

So an emulated kernel runs the kernel's real instruction stream here, one call per
instruction: its tile configuration as written to memory, each tile's address and row
stride, and which tiles each dot product reads. Only the last step, from LLVM intrinsic to
machine instruction, is not exercised; ``tests/schedules/test_x86_amx.py`` checks it in the
assembly and, on a CPU with AMX, runs the real kernels too.

The model follows the instruction descriptions of the Intel SDM (Vol. 2, "TDPBSUD" etc.):

- ``ldtilecfg m512``: byte 0 the palette (1: 8 tiles of at most 16 rows x 64 bytes), byte 1
  the start row (0), bytes ``16 + 2t`` the bytes per row (``colsb``) of tile ``t`` (16-bit),
  byte ``48 + t`` its rows. Anything else is a fault, as on the CPU;
- ``tileloadd t, [p + r * stride]``: ``rows(t)`` rows of ``colsb(t)`` bytes;
- ``tdpbsud c, a, b``: ``c.row[m].dword[n] += sum_k sum_{i<4} s8(a.row[m].byte[4k+i]) *
  u8(b.row[k].byte[4n+i])`` for ``k < colsb(a) / 4``, with the shape checks of the SDM
  (``rows(c) == rows(a)``, ``colsb(c) == colsb(b)``, ``colsb(a) == 4 * rows(b)``), int32
  wrap-around; ``tdpbusd`` the same with ``a`` unsigned and ``b`` signed;
- ``tilestored t, [p + r * stride]``; ``tilerelease`` returns to the init state.

The state is per thread, as the CPU's is (TVM's worker threads each configure their tiles).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import tvm

#: Global function names, one per instruction (registered on import).
PREFIX = "tvmquant.amx_emulator."

_PALETTE1_TILES, _MAX_ROWS, _MAX_COLSB = 8, 16, 64


class AmxFault(RuntimeError):
    """What the CPU would raise as #GP or #UD: an invalid configuration or tile shape."""


class _Tiles(threading.local):
    def __init__(self):
        self.rows: list[int] | None = None  # None: init state (no configuration)
        self.colsb: list[int] = []
        self.data = np.zeros((_PALETTE1_TILES, _MAX_ROWS, _MAX_COLSB), np.uint8)


_state = _Tiles()
#: How many times each instruction ran (all threads), for tests.
counts: dict[str, int] = {}
_lock = threading.Lock()


def _count(name: str) -> None:
    with _lock:
        counts[name] = counts.get(name, 0) + 1


def _address(ptr) -> int:
    return ptr.value if isinstance(ptr, ctypes.c_void_p) else int(ptr)


def _bytes(ptr, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(_address(ptr)))


def parse_tile_config(raw: bytes | np.ndarray) -> tuple[list[int], list[int]]:
    """``(rows, colsb)`` of the 8 tiles from a 64-byte ``ldtilecfg`` operand (palette 1);
    :class:`AmxFault` where the CPU would fault."""
    b = np.frombuffer(bytes(raw), np.uint8)
    if b.size != 64:
        raise AmxFault(f"a tile configuration is 64 bytes, got {b.size}")
    if b[0] != 1:
        raise AmxFault(f"palette {b[0]}: only palette 1 is modelled")
    if b[1] != 0:
        raise AmxFault(f"start row {b[1]} must be 0")
    if b[2:16].any() or b[32:48].any() or b[56:64].any():
        raise AmxFault("reserved bytes of the tile configuration are not zero")
    colsb = [int(v) for v in b[16:32].view("<u2")]
    rows = [int(v) for v in b[48:56]]
    for t in range(_PALETTE1_TILES):
        if rows[t] > _MAX_ROWS or colsb[t] > _MAX_COLSB or (rows[t] == 0) != (colsb[t] == 0):
            raise AmxFault(f"tile {t}: {rows[t]} rows x {colsb[t]} bytes is not valid")
    return rows, colsb


def _tile(t: int) -> tuple[int, int]:
    if _state.rows is None:
        raise AmxFault("tile instruction before ldtilecfg")
    if not 0 <= t < _PALETTE1_TILES or _state.rows[t] == 0:
        raise AmxFault(f"tile {t} is not configured")
    return _state.rows[t], _state.colsb[t]


def ldtilecfg(ptr) -> int:
    _count("ldtilecfg")
    _state.rows, _state.colsb = parse_tile_config(_bytes(ptr, 64).tobytes())
    _state.data[:] = 0  # loading a configuration zeroes the tiles
    return 0


def tilerelease() -> int:
    _count("tilerelease")
    _state.rows, _state.colsb = None, []
    _state.data[:] = 0
    return 0


def tileloadd64(t: int, ptr, stride: int) -> int:
    _count("tileloadd64")
    rows, colsb = _tile(t)
    base = _address(ptr)
    for r in range(rows):
        _state.data[t, r, :colsb] = _bytes(base + r * stride, colsb)
    _state.data[t, rows:] = 0
    _state.data[t, :, colsb:] = 0
    return 0


def tilestored64(t: int, ptr, stride: int) -> int:
    _count("tilestored64")
    rows, colsb = _tile(t)
    base = _address(ptr)
    for r in range(rows):
        _bytes(base + r * stride, colsb)[:] = _state.data[t, r, :colsb]
    return 0


def _dot(name: str, c: int, a: int, b: int, a_signed: bool, b_signed: bool) -> None:
    _count(name)
    (rc, cc), (ra, ca), (rb, cb) = _tile(c), _tile(a), _tile(b)
    if len({c, a, b}) != 3:
        raise AmxFault(f"{name} with repeated tiles {c}, {a}, {b}")
    if rc != ra or cc != cb or ca != 4 * rb or cc % 4 or ca % 4:
        raise AmxFault(f"{name} shapes: c {rc}x{cc}, a {ra}x{ca}, b {rb}x{cb}")

    def operand(t, rows, nbytes, signed):
        v = _state.data[t, :rows, :nbytes]
        return (v.view(np.int8) if signed else v).astype(np.int64)

    sa = operand(a, ra, ca, a_signed).reshape(ra, ca // 4, 4)
    sb = operand(b, rb, cb, b_signed).reshape(rb, cb // 4, 4)
    dot = np.einsum("mki,kni->mn", sa, sb)
    acc = _state.data[c, :rc, :cc].copy().view("<i4").astype(np.int64) + dot
    _state.data[c, :rc, :cc] = acc.astype(np.int32).view(np.uint8).reshape(rc, cc)


def tdpbsud(c: int, a: int, b: int) -> int:
    """``c += s8(a) . u8(b)``."""
    _dot("tdpbsud", c, a, b, True, False)
    return 0


def tdpbusd(c: int, a: int, b: int) -> int:
    """``c += u8(a) . s8(b)``."""
    _dot("tdpbusd", c, a, b, False, True)
    return 0

for _fn in (ldtilecfg, tilerelease, tileloadd64, tilestored64, tdpbsud, tdpbusd):
    tvm.register_global_func(PREFIX + _fn.__name__, _fn, override=True)
