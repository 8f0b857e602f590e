"""Checkpoints that are data, never code: a ``.npz`` of arrays and a JSON header.

A checkpoint holds a :class:`vijax.FitState`: its array leaves, the raw data of
its typed PRNG key with the key's implementation name, and a JSON description
of the tree (dicts, lists, tuples, ``None`` and NamedTuples by module, name and
fields). Reading one never executes anything from the file: NumPy reads it
with ``allow_pickle=False``, and a NamedTuple class is looked up among the
modules the process has *already* imported (nothing is imported because a
file names it). A class not found there comes back as a plain namedtuple
with the saved fields, and resuming then fails the structure check against
the optimizer with a clear message.

Writes are atomic: the file is written beside its destination, flushed and
``fsync``-ed, renamed over it, and the folder is ``fsync``-ed, so a crash
never leaves a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import collections
import io
import json
import os
import sys
import tempfile
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.fitting._types import FitState

CHECKPOINT_NAME = "fit_state.npz"
"""The file name ``fit`` writes inside its ``checkpoint_dir``."""

_FORMAT = "vijax.FitState"
_VERSION = 2  # version 1 was a pickle; it is refused (see _refuse_pickle)
_HEADER = "__header__"
_PICKLE_NAME = "fit_state.pkl"


# ----------------------------------------------------------------- encoding
def _encode(node: Any, leaves: list, where: str) -> Any:
    """A JSON description of ``node``; its arrays are appended to ``leaves``."""
    if node is None:
        return {"t": "none"}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        cls = type(node)
        return {
            "t": "namedtuple",
            "module": cls.__module__,
            "name": cls.__qualname__,
            "fields": list(cls._fields),
            "c": [_encode(v, leaves, f"{where}.{f}") for f, v in zip(cls._fields, node)],
        }
    if type(node) in (tuple, list):
        return {
            "t": type(node).__name__,
            "c": [_encode(v, leaves, f"{where}[{i}]") for i, v in enumerate(node)],
        }
    if type(node) is dict:
        keys = list(node)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(
                f"`state` can be saved only with string dict keys; {where} has keys "
                f"{keys!r}."
            )
        keys = sorted(keys)  # jax flattens dicts in sorted-key order
        return {"t": "dict", "k": keys, "c": [_encode(node[k], leaves, f"{where}[{k!r}]") for k in keys]}
    if isinstance(node, (jax.Array, np.ndarray, np.generic, int, float, bool)):
        arr = node
        if isinstance(arr, jax.Array) and jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"`state` can hold a typed PRNG key only in `state.key`; got one at {where}."
            )
        arr = np.asarray(arr)
        if arr.dtype == object:
            raise TypeError(f"`state` must hold arrays; got an object array at {where}.")
        leaves.append(arr)
        return {"t": "leaf", "i": len(leaves) - 1, "dtype": str(arr.dtype), "shape": list(arr.shape)}
    raise TypeError(
        "`state` can be saved only if it is built of arrays, dicts (string keys), "
        f"lists, tuples, NamedTuples and None; got a {type(node).__name__} at {where}."
    )


def save_checkpoint(path: str | os.PathLike, state: FitState) -> str:
    """Writes ``state`` to ``path`` atomically and returns the path written.

    The file is a ``.npz`` archive (NumPy's format, read back with
    ``allow_pickle=False``): the state's arrays, the raw data of its typed
    key, and a JSON header with the tree structure, dtypes, shapes and the
    key's implementation. It is written beside ``path``, flushed to disk,
    renamed over ``path`` and the folder is flushed, so a crash never leaves
    a half-written checkpoint in place of a good one. If ``path`` is a
    directory, the file is ``path/fit_state.npz``.

    Args:
      path: a file path or an existing directory.
      state: a :class:`FitState` (from ``result.state``), batched or not.

    Returns:
      The path of the file written.

    Raises:
      TypeError: ``state`` is not a FitState, or holds something other than
        arrays, dicts with string keys, lists, tuples, NamedTuples and None.
    """
    if not isinstance(state, FitState):
        raise TypeError(f"`state` must be a vijax.FitState; got {type(state).__name__}.")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    key = state.key
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        key = jax.random.wrap_key_data(jnp.asarray(key))
    leaves: list = []
    tree = _encode(state._replace(key=None), leaves, "state")
    header = {
        "format": _FORMAT,
        "version": _VERSION,
        "key_impl": str(jax.random.key_impl(key)),
        "key_shape": list(key.shape),
        "num_leaves": len(leaves),
        "tree": tree,
    }
    arrays = {f"leaf_{i}": leaf for i, leaf in enumerate(leaves)}
    arrays["key"] = np.asarray(jax.random.key_data(key))
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fit_state.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)
    return path


def _fsync_dir(folder: str) -> None:
    """Flushes the rename to disk (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------- decoding
def _find_class(module: Any, name: Any, fields: list):
    """The NamedTuple class ``module.name`` if already imported and matching, else None.

    Matching: the saved fields are the class's, or their first ones where the
    class's others have defaults.
    """
    if not isinstance(module, str) or not isinstance(name, str):
        return None
    obj = sys.modules.get(module)
    for part in name.split("."):
        if obj is None:
            return None
        # vars(), not getattr: no module __getattr__ or descriptor runs.
        obj = vars(obj).get(part) if hasattr(obj, "__dict__") else None
    if not (isinstance(obj, type) and issubclass(obj, tuple)):
        return None
    have = list(getattr(obj, "_fields", ()))
    # A class that has since gained fields with defaults (FitState.control)
    # still reads what an older version saved.
    defaults = getattr(obj, "_field_defaults", {})
    if have[:len(fields)] == fields and all(f in defaults for f in have[len(fields):]):
        return obj
    return None


def _decode(node: Any, leaves: list, bad) -> Any:
    if not isinstance(node, dict):
        raise bad("its tree description is malformed")
    kind = node.get("t")
    children = node.get("c", [])
    if not isinstance(children, list):
        raise bad("its tree description is malformed")
    if kind == "none":
        return None
    if kind == "leaf":
        i = node.get("i")
        if not isinstance(i, int) or not 0 <= i < len(leaves):
            raise bad("its tree refers to a missing array")
        arr = leaves[i]
        want = node.get("dtype")
        try:
            want = np.dtype(jnp.dtype(want))
        except TypeError:
            raise bad(f"it records an unknown dtype {want!r}") from None
        if arr.dtype != want:
            if arr.dtype.itemsize != want.itemsize or arr.dtype.kind != "V":
                raise bad(f"array {i} has dtype {arr.dtype}, the header says {want}")
            arr = arr.view(want)  # extended dtypes (bfloat16) are stored as raw bytes
        if list(arr.shape) != node.get("shape"):
            raise bad(f"array {i} has shape {arr.shape}, the header says {node.get('shape')}")
        return jnp.asarray(arr)
    if kind in ("tuple", "list"):
        items = [_decode(c, leaves, bad) for c in children]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        keys = node.get("k")
        if not isinstance(keys, list) or len(keys) != len(children):
            raise bad("its tree description is malformed")
        return {k: _decode(c, leaves, bad) for k, c in zip(keys, children)}
    if kind == "namedtuple":
        fields = node.get("fields")
        if not isinstance(fields, list) or len(fields) != len(children):
            raise bad("its tree description is malformed")
        items = [_decode(c, leaves, bad) for c in children]
        cls = _find_class(node.get("module"), node.get("name"), fields)
        if cls is None:
            try:
                name = str(node.get("name", "Saved")).rsplit(".", 1)[-1]
                cls = collections.namedtuple(name, fields)
            except (TypeError, ValueError):
                raise bad("it names an invalid NamedTuple") from None
        return cls(*items)
    raise bad(f"its tree has an unknown node kind {kind!r}")


def _refuse_pickle(path: str) -> ValueError:
    return ValueError(
        f"`path` {path} is a pickle checkpoint from vijax 0.1 (format version 1); "
        "vijax no longer reads pickles, since unpickling a file can run code. To "
        "convert one you trust, in a Python session: `import pickle, jax, vijax; "
        "p = pickle.load(open(OLD, 'rb')); s = p['state']; "
        "vijax.save_checkpoint(NEW, s._replace(key=jax.random.wrap_key_data("
        "s.key, impl=p['key_impl'])))`, with NEW ending in .npz."
    )


def load_checkpoint(path: str | os.PathLike) -> FitState:
    """Returns the :class:`FitState` saved at ``path`` (a file or a checkpoint dir).

    Continue the run with ``vijax.fit(None, family, log_joint, state, ...)``;
    the continuation is bitwise identical to a run that was never stopped.
    Loading never runs code from the file (NumPy reads it with
    ``allow_pickle=False``, and the tree is rebuilt from a JSON header); the
    state's structure is checked against the optimizer when a fit resumes.

    Args:
      path: the file written by :func:`save_checkpoint` or by ``fit``'s
        ``checkpoint_dir``, or that directory.

    Returns:
      The saved :class:`FitState`, with ``jax.Array`` leaves and a typed key.

    Raises:
      FileNotFoundError: there is no checkpoint at ``path``.
      ValueError: the file is not a vijax checkpoint, is truncated or
        corrupted, has another format version, or is an old pickle
        checkpoint (the message says how to convert it); the message names
        the path.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, CHECKPOINT_NAME)) and os.path.exists(
            os.path.join(path, _PICKLE_NAME)
        ):
            raise _refuse_pickle(os.path.join(path, _PICKLE_NAME))
        path = os.path.join(path, CHECKPOINT_NAME)
    with open(path, "rb") as f:
        raw = f.read()

    def bad(why: str) -> ValueError:
        return ValueError(
            f"`path` must be a vijax checkpoint (format {_FORMAT!r}, version "
            f"{_VERSION}); {path} is not: {why}."
        )

    if raw[:1] == b"\x80":  # the pickle protocol 2+ opcode
        raise _refuse_pickle(path)
    if not raw.startswith(b"PK"):
        raise bad("it is not a .npz archive")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise bad(f"it cannot be read ({type(e).__name__}: {e}); it may be truncated") from None
    try:
        header = json.loads(arrays.pop(_HEADER).tobytes().decode("utf-8"))
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError):
        raise bad("its header is missing or corrupted") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise bad("its header names another format")
    if header.get("version") != _VERSION:
        raise bad(f"it has format version {header.get('version')!r}")
    num = header.get("num_leaves")
    if not isinstance(num, int) or num < 0:
        raise bad("its header is malformed")
    try:
        leaves = [arrays[f"leaf_{i}"] for i in range(num)]
        key_data = arrays["key"]
    except KeyError as e:
        raise bad(f"the array {e.args[0]!r} is missing") from None
    state = _decode(header.get("tree"), leaves, bad)
    if not isinstance(state, FitState):
        raise bad("it does not hold a FitState")
    impl = header.get("key_impl")
    try:
        key = jax.random.wrap_key_data(jnp.asarray(key_data), impl=impl)
    except Exception as e:  # an unknown implementation name or wrong key data shape
        raise bad(f"its key cannot be rebuilt ({e})") from None
    if list(key.shape) != header.get("key_shape"):
        raise bad("its key has the wrong shape")
    return state._replace(key=key)
