"""File input/output for the command line: atomic writes and calibration data in ``.npz`` files.

Every writer here first writes into a private temporary folder next to the destination (same
file system) and then moves the finished file onto the destination with :func:`os.replace`,
which is atomic on POSIX and Windows. A failure at any point (an exception while serialising,
a full disk, a failing linker) removes the temporary file and re-raises, so the destination
either keeps its previous content or does not exist: no half-written file is ever left there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .calibration.runner import CalibrationDataError

__all__ = [
    "atomic_path",
    "atomic_save_npz",
    "atomic_write_bytes",
    "atomic_write_json",
    "export_library_atomic",
    "json_dumps",
    "load_calibration_npz",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; move it onto ``path`` when the block succeeds.

    The temporary file has the same name as ``path`` (so tools that look at the suffix, such
    as TVM's ``export_library``, behave the same) inside a hidden temporary folder created in
    the destination's folder. The folder and everything in it are removed whatever happens.

    Parameters
    ----------
    path : str or os.PathLike
        The final destination. Its folder must exist.

    Yields
    ------
    pathlib.Path
        Where the block must write the file.

    Raises
    ------
    FileNotFoundError
        If the destination's folder does not exist.
    IsADirectoryError
        If ``path`` is an existing folder.
    """
    final = Path(path)
    folder = final.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {str(folder)!r} does not exist")
    if final.is_dir():
        raise IsADirectoryError(f"output path {str(final)!r} is a folder, not a file")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder))
    try:
        tmp = tmpdir / final.name
        yield tmp
        if not tmp.is_file():
            raise OSError(f"nothing was written for {str(final)!r}")
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (all of it or, on failure, nothing).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; replaced if it exists.
    data : bytes
        The complete content.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_default(obj: Any) -> Any:
    """Convert what :mod:`json` does not know: NumPy scalars and arrays, paths, sets."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, np.dtype):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def json_dumps(obj: Any) -> str:
    """Serialise ``obj`` as indented JSON (2 spaces), converting NumPy values.

    Parameters
    ----------
    obj : Any
        Dicts, lists, strings, numbers, NumPy scalars and arrays, paths.

    Returns
    -------
    str
        The JSON text, ending with a newline.
    """
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    The object is serialised before anything is written, so an unserialisable object leaves
    the destination untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    obj : Any
        See :func:`json_dumps`.
    """
    atomic_write_bytes(path, json_dumps(obj).encode("utf-8"))


def atomic_save_npz(path: PathLike, compressed: bool = False, **arrays: np.ndarray) -> None:
    """Save arrays into an ``.npz`` file at exactly ``path``, atomically.

    Unlike :func:`numpy.savez`, no ``.npz`` suffix is appended to ``path``. The arrays are
    stored in the order given, which is the order :func:`numpy.load` lists them in.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    compressed : bool
        Use :func:`numpy.savez_compressed`.
    **arrays : numpy.ndarray
        The arrays by name.
    """
    save = np.savez_compressed if compressed else np.savez
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        save(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def export_library_atomic(ex: Any, path: PathLike, **kwargs: Any) -> None:
    """Export a TVM executable (``ex.export_library``) to ``path`` atomically.

    The library is exported (compiled and linked) into a temporary file of the same name next
    to ``path``, then moved onto ``path``. If exporting raises, the temporary file is removed,
    the exception propagates and ``path`` is left as it was.

    Parameters
    ----------
    ex : tvm.runtime.Executable or tvm.runtime.Module
        Anything with ``export_library(file_name, **kwargs)``.
    path : str or os.PathLike
        Destination, e.g. ``model.so`` (the suffix picks the format, as in TVM).
    **kwargs
        Passed to ``export_library`` (e.g. ``fcompile`` for cross-compiling).
    """
    with atomic_path(path) as tmp:
        ex.export_library(str(tmp), **kwargs)


# --------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------


def load_calibration_npz(
    path: PathLike,
    signature: Mapping[str, tuple[tuple[int, ...] | None, str]],
    aliases: Mapping[str, str] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Load calibration samples from an ``.npz`` file with one array per model input.

    Each array stacks the samples on a new leading axis: an input of shape ``(1, 3, 48, 192)``
    is stored as an array of shape ``(N, 1, 3, 48, 192)``, and every input has the same ``N``.
    Build one with ``numpy.savez("calib.npz", x=np.stack(samples_of_x))``. Floating-point
    arrays are cast to the model's floating-point dtype (``float64`` to ``float32``); any
    other dtype difference is an error.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file.
    signature : mapping of name to (shape, dtype)
        The model's inputs in order, as :func:`tvmquant.calibration.runner.input_signature`
        gives them (a shape may be ``None`` when unknown; it is then not checked).
    aliases : mapping of str to str, optional
        Other accepted array names, mapped to the signature's names (e.g. TVM's sanitized
        parameter name ``input_1`` for the ONNX name ``input.1``).

    Returns
    -------
    list of dict of str to numpy.ndarray
        One ``{input_name: array}`` per sample, keyed by the signature's names.

    Raises
    ------
    CalibrationDataError
        If the file is missing or not an ``.npz``, an array name is not a model input, an
        input is missing, a shape, dtype or sample count does not match, or it holds no sample.
    """
    label = f"calibration data {str(path)!r}"
    aliases = dict(aliases or {})
    file = Path(path)
    if not file.exists():
        raise CalibrationDataError(f"{label} does not exist")
    if not file.is_file():
        raise CalibrationDataError(f"{label} is not a file")
    try:
        loaded = np.load(file, allow_pickle=False)
    except Exception as err:  # ValueError (pickled/garbage), BadZipFile, EOFError, OSError
        raise CalibrationDataError(
            f"{label} is not a NumPy .npz file ({type(err).__name__}: {err}); save one with "
            "numpy.savez(path, input_name=array)"
        ) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise CalibrationDataError(
            f"{label} is a single .npy array, not an .npz archive; save one array per model "
            "input with numpy.savez(path, input_name=array)"
        )
    expected = ", ".join(repr(n) for n in signature) or "(none)"
    with loaded:
        names = list(loaded.files)
        if not names:
            raise CalibrationDataError(f"{label} holds no arrays; the model's inputs are "
                                       f"{expected}")
        resolved: dict[str, str] = {}  # signature name -> array name in the file
        unknown = []
        for name in names:
            target = name if name in signature else aliases.get(name)
            if target is None or target not in signature:
                unknown.append(name)
            elif target in resolved:
                raise CalibrationDataError(
                    f"{label} gives input {target!r} twice (as {resolved[target]!r} and "
                    f"{name!r})"
                )
            else:
                resolved[target] = name
        if unknown:
            raise CalibrationDataError(
                f"{label} has array(s) {', '.join(map(repr, unknown))} that are not inputs of "
                f"the model; the model's inputs are {expected}"
            )
        missing = [name for name in signature if name not in resolved]
        if missing:
            raise CalibrationDataError(
                f"{label} lacks input(s) {', '.join(map(repr, missing))}; the model's inputs "
                f"are {expected}"
            )

        arrays: dict[str, np.ndarray] = {}
        for name, (shape, dtype) in signature.items():
            key = resolved[name]
            try:
                arr = loaded[key]
            except Exception as err:  # truncated member, object array (pickle refused), ...
                raise CalibrationDataError(
                    f"{label}: array {key!r} cannot be read ({type(err).__name__}: {err})"
                ) from None
            if shape is not None:
                shape = tuple(int(d) for d in shape)
                if arr.ndim != len(shape) + 1 or tuple(arr.shape[1:]) != shape:
                    hint = (
                        "; add a leading sample axis (e.g. array[None] or numpy.stack(samples))"
                        if tuple(arr.shape) == shape else ""
                    )
                    raise CalibrationDataError(
                        f"{label}: input {name!r} has shape {tuple(arr.shape)}, expected "
                        f"N x {shape}, i.e. ({', '.join(['N', *map(str, shape)])}) (N samples "
                        f"stacked on a new leading axis){hint}"
                    )
            elif arr.ndim < 1:
                raise CalibrationDataError(
                    f"{label}: input {name!r} is a scalar; expected N samples stacked on a "
                    "leading axis"
                )
            if str(arr.dtype) != dtype:
                if arr.dtype.kind == "f" and np.dtype(dtype).kind == "f":
                    logger.info("casting calibration input %r from %s to %s", name, arr.dtype,
                                dtype)
                    arr = arr.astype(dtype)
                else:
                    raise CalibrationDataError(
                        f"{label}: input {name!r} has dtype {arr.dtype}, the model expects "
                        f"{dtype}"
                    )
            arrays[name] = np.ascontiguousarray(arr)

    counts = {name: int(arr.shape[0]) for name, arr in arrays.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name!r}: {n}" for name, n in counts.items())
        raise CalibrationDataError(
            f"{label}: inputs have different numbers of samples (leading axis): {listed}"
        )
    count = next(iter(counts.values()), 0)
    if count == 0:
        raise CalibrationDataError(f"{label} holds no samples (the leading axis is 0)")
    logger.info("loaded %d calibration samples from %s", count, path)
    return [{name: arr[i] for name, arr in arrays.items()} for i in range(count)]

