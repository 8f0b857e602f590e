"""Checkpoints are data, never code: round trips, refusals and atomic writes."""

import os
import pickle
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vijax
from vijax.fitting import _checkpoint, _engine


def log_joint(z):
    return -0.5 * jnp.sum(jnp.square(z["w"] - 1.0)) - 0.5 * jnp.square(z["b"])


FAMILY = vijax.full_rank()  # one family object: fit's compiled chunk is reused
OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))


def _fit(key, params, optimizer, **kw):
    return vijax.fit(key, FAMILY, log_joint, params, optimizer=optimizer,
                     num_samples=2, progress=False, chunk_size=50, **kw)


@pytest.fixture(scope="module")
def state():
    params = FAMILY.init({"w": jnp.zeros(3), "b": jnp.zeros(())})
    opt = OPTIMIZER
    return _fit(jax.random.key(3), params, opt, num_steps=7).state, opt, params


def test_round_trip_keeps_every_leaf_type_and_key(tmp_path, state):
    st, opt, _ = state
    path = vijax.save_checkpoint(tmp_path / "s.npz", st)
    back = vijax.load_checkpoint(path)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(st)
    chex.assert_trees_all_equal(back.params, st.params)
    chex.assert_trees_all_equal(back.opt_state, st.opt_state)
    assert jax.random.key_impl(back.key) == jax.random.key_impl(st.key)
    np.testing.assert_array_equal(jax.random.key_data(back.key), jax.random.key_data(st.key))


def test_resume_from_a_file_is_bitwise(tmp_path, state):
    st, opt, params = state
    full = _fit(jax.random.key(3), params, opt, num_steps=20)
    vijax.save_checkpoint(tmp_path, st)
    rest = _fit(None, params=vijax.load_checkpoint(tmp_path), optimizer=opt, num_steps=13)
    chex.assert_trees_all_equal(rest.params, full.params)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float64])
def test_other_dtypes_round_trip(tmp_path, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        params = {"a": jnp.arange(3, dtype=dtype), "b": [jnp.ones((2, 2), dtype), None]}
        st = vijax.FitState(params, (), jnp.zeros((), jnp.int32), jax.random.key(0))
        back = vijax.load_checkpoint(vijax.save_checkpoint(tmp_path / "x.npz", st))
        assert back.params["a"].dtype == dtype and back.params["b"][1] is None
        chex.assert_trees_all_equal(back.params, params)


def test_a_batched_legacy_key_state_round_trips(tmp_path):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)  # legacy uint32 keys
    st = vijax.FitState({"a": jnp.zeros((3, 2))}, (), jnp.zeros((3,), jnp.int32), keys)
    back = vijax.load_checkpoint(vijax.save_checkpoint(tmp_path / "b.npz", st))
    assert back.key.shape == (3,) and jnp.issubdtype(back.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(back.key), keys)


class _Boom:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "fit_state.npz"
    crafted.write_bytes(pickle.dumps({"format": "vijax.FitState", "x": _Boom(str(marker))}))
    with pytest.raises(ValueError, match="pickle checkpoint.*no longer reads pickles.*convert"):
        vijax.load_checkpoint(crafted)
    with pytest.raises(ValueError, match="pickle"):
        vijax.load_checkpoint(tmp_path)  # the directory form
    assert not marker.exists()


def test_an_old_pickle_checkpoint_directory_says_how_to_convert(tmp_path):
    (tmp_path / "fit_state.pkl").write_bytes(pickle.dumps({"format": "vijax.FitState"}))
    with pytest.raises(ValueError, match=r"fit_state.pkl.*vijax.save_checkpoint\(NEW"):
        vijax.load_checkpoint(tmp_path)


def test_a_pickled_object_array_inside_an_npz_is_refused(tmp_path, state):
    st, _, _ = state
    path = vijax.save_checkpoint(tmp_path / "s.npz", st)
    with np.load(path) as f:
        arrays = dict(f)
    marker = tmp_path / "pwned"
    arrays["leaf_0"] = np.array([_Boom(str(marker))], dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=f"{path}.*cannot be read"):
        vijax.load_checkpoint(path)
    assert not marker.exists()


def test_truncated_corrupted_and_foreign_files_name_the_path(tmp_path, state):
    st, _, _ = state
    good = vijax.save_checkpoint(tmp_path / "good.npz", st)
    raw = open(good, "rb").read()
    cases = {
        "truncated.npz": raw[: len(raw) // 2],
        "empty.npz": b"",
        "text.npz": b"hello",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"{path}"):
            vijax.load_checkpoint(path)
    # A header from another version, and one that is not JSON.
    with np.load(good) as f:
        arrays = dict(f)
    for name, header in [("version.npz", b'{"format": "vijax.FitState", "version": 99}'),
                         ("nojson.npz", b"\xff\x00garbage")]:
        path = tmp_path / name
        np.savez(path, **{**arrays, "__header__": np.frombuffer(header, np.uint8)})
        with pytest.raises(ValueError, match=f"{path}.*(version 99|header)"):
            vijax.load_checkpoint(path)
    # A missing array, and an array whose shape the header contradicts.
    path = tmp_path / "missing.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if k != "leaf_0"})
    with pytest.raises(ValueError, match=f"{path}.*'leaf_0' is missing"):
        vijax.load_checkpoint(path)
    path = tmp_path / "shape.npz"
    np.savez(path, **{**arrays, "leaf_0": np.zeros(7, arrays["leaf_0"].dtype)})
    with pytest.raises(ValueError, match=f"{path}.*shape"):
        vijax.load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        vijax.load_checkpoint(tmp_path / "nothing.npz")


def test_a_failed_write_never_replaces_a_good_checkpoint(tmp_path, state, monkeypatch):
    st, _, _ = state
    path = vijax.save_checkpoint(tmp_path / "c.npz", st)
    before = open(path, "rb").read()

    def broken_savez(f, **arrays):
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(_checkpoint.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        vijax.save_checkpoint(path, st._replace(step=st.step + 1))
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.npz"]  # no temporary left behind


def test_the_write_is_flushed_renamed_and_the_folder_synced(tmp_path, state, monkeypatch):
    st, _, _ = state
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(_checkpoint.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(_checkpoint.os, "replace",
                        lambda a, b: (calls.append("replace"), real_replace(a, b)))
    vijax.save_checkpoint(tmp_path / "c.npz", st)
    assert calls == ["fsync", "replace", "fsync"]  # file, rename, folder
    assert zipfile.is_zipfile(tmp_path / "c.npz")


def test_a_state_from_another_optimizer_is_refused_on_resume(tmp_path, state):
    st, _, params = state
    vijax.save_checkpoint(tmp_path, st)
    with pytest.raises(ValueError, match="opt_state` does not match `optimizer`"):
        _fit(None, vijax.load_checkpoint(tmp_path), optax.sgd(1e-2), num_steps=2)


def test_unsaveable_states_raise_before_writing(tmp_path):
    key = jax.random.key(0)
    for bad, where in [({1: jnp.zeros(2)}, "string dict keys"),
                       ({"a": object()}, "got a object"),
                       ({"k": jax.random.key(1)}, "typed PRNG key only in `state.key`")]:
        st = vijax.FitState(bad, (), jnp.zeros((), jnp.int32), key)
        with pytest.raises(TypeError, match=where):
            vijax.save_checkpoint(tmp_path / "x.npz", st)
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="vijax.FitState"):
        vijax.save_checkpoint(tmp_path / "x.npz", {"a": 1})


def test_a_namedtuple_class_is_never_imported_by_load(tmp_path):
    st = vijax.FitState({"a": jnp.zeros(2)}, (), jnp.zeros((), jnp.int32), jax.random.key(0))
    path = vijax.save_checkpoint(tmp_path / "n.npz", st)
    with np.load(path) as f:
        arrays = dict(f)
    import json

    header = json.loads(arrays["__header__"].tobytes())
    header["tree"]["c"][1] = {"t": "namedtuple", "module": "a_module_never_imported",
                              "name": "Evil", "fields": [], "c": []}
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)
    back = vijax.load_checkpoint(path)
    assert type(back.opt_state).__name__ == "Evil" and back.opt_state == ()
    assert "a_module_never_imported" not in __import__("sys").modules


def test_a_checkpoint_dir_that_cannot_be_written_is_refused_before_any_step(tmp_path):
    """It was checked at the first save: without `checkpoint_every`, the run's end."""
    params = FAMILY.init({"w": jnp.zeros(3), "b": jnp.zeros(())})
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    calls = []

    def counted(z):
        jax.debug.callback(lambda: calls.append(1))
        return log_joint(z)

    for bad, match in ((a_file, "an existing file"), (a_file / "sub", "can write")):
        with pytest.raises(ValueError, match=rf"`checkpoint_dir` must be a directory.*{match}"):
            vijax.fit(jax.random.key(0), FAMILY, counted, params, optimizer=OPTIMIZER,
                      num_steps=10, progress=False, checkpoint_dir=bad)
    assert not calls
    # A call refused for another argument leaves no directory behind.
    with pytest.raises(ValueError, match="num_samples"):
        vijax.fit(jax.random.key(0), FAMILY, log_joint, params, optimizer=OPTIMIZER,
                  num_steps=3, num_samples=0, checkpoint_dir=tmp_path / "never")
    assert not os.path.exists(tmp_path / "never")
    # A missing directory is made, before the run.
    _fit(jax.random.key(0), params, OPTIMIZER, num_steps=3,
         checkpoint_dir=tmp_path / "new" / "dir")
    assert os.path.exists(tmp_path / "new" / "dir" / _engine.CHECKPOINT_NAME)


def test_an_error_mid_run_keeps_the_last_chunk_on_disk_and_a_failed_last_save_warns(
        tmp_path, monkeypatch):
    params = FAMILY.init({"w": jnp.zeros(3), "b": jnp.zeros(())})

    class Boom(Exception):
        pass

    def hook(step):  # between chunks, on the host: fail after the second chunk
        if step >= 100:
            raise Boom("the host failed")

    monkeypatch.setattr(_engine, "_host_hook", hook)
    with pytest.raises(Boom):
        _fit(jax.random.key(0), params, OPTIMIZER, num_steps=1000, checkpoint_dir=tmp_path)
    saved = vijax.load_checkpoint(tmp_path / _engine.CHECKPOINT_NAME)
    assert int(saved.step) == 100

    monkeypatch.setattr(_engine, "_host_hook", lambda step: None)

    def cannot(path, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_engine, "save_checkpoint", cannot)
    with pytest.warns(RuntimeWarning, match="could not write its final checkpoint"):
        result = _fit(jax.random.key(0), params, OPTIMIZER, num_steps=60,
                      checkpoint_dir=tmp_path / "full")
    assert int(result.state.step) == 60
