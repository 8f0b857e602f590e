"""print(result): a FitResult / FitState shows the facts in one line, never its arrays' values."""

import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vijax


def _log_joint(z):
    return -0.5 * jnp.sum((z - 1.0) ** 2)


@pytest.fixture(scope="module")
def result():
    family = vijax.mean_field()
    return vijax.fit(jax.random.key(0), family, _log_joint, family.init(jnp.zeros(5)),
                     optimizer=optax.adam(0.05), num_steps=150, progress=False)


def test_a_fit_result_prints_short_and_names_the_key_facts(result):
    text = repr(result)
    assert len(text) < 400, text
    assert str(result) == text  # print() shows the same
    assert text.startswith("FitResult(steps=150, elbo=")
    assert "(mean of the last 100 steps' estimates)" in text
    assert "skipped=0" in text and "stopped_early=False" in text and "interrupted=False" in text
    assert "params=MeanFieldParams(loc: float32[5], raw_scale: float32[5])" in text
    # The ELBO shown is the mean of the last 100 estimates.
    shown = float(re.search(r"elbo=(\S+) ", text).group(1))
    np.testing.assert_allclose(shown, np.asarray(result.trace.elbo[-100:]).mean(), rtol=1e-4)
    # The tuple's own repr (what print showed before) runs for pages of arrays.
    assert len(tuple.__repr__(result)) > 2000


def test_no_array_values_and_no_optimizer_state_numbers_are_shown(result):
    text = repr(result)
    assert "Array(" not in text and "opt_state" not in text and "ScaleByAdamState" not in text
    # The only non-integer number in the line is the ELBO.
    floats = re.findall(r"-?\d+\.\d+", text)
    assert len(floats) == 1, floats
    mu = jax.tree_util.tree_leaves(result.state.opt_state[0].mu)[0]
    assert f"{float(mu[0]):.4f}" not in text


def test_the_record_itself_is_unchanged(result):
    assert vijax.FitResult._fields == (
        "params", "state", "trace", "num_skipped", "interrupted", "stopped_early")
    again = pickle.loads(pickle.dumps(result))
    assert type(again) is vijax.FitResult and type(again.state) is vijax.FitState
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(result)
    leaves = jax.tree_util.tree_leaves(result)
    assert len(leaves) == len(jax.tree_util.tree_leaves(tuple(result)))
    assert isinstance(result, tuple) and result[0] is result.params


def test_a_fit_state_prints_its_step_and_summarizes_the_optimizer_state(result):
    text = repr(result.state)
    assert len(text) < 300, text
    assert text.startswith("FitState(step=150, params=MeanFieldParams(loc: float32[5]")
    assert "opt_state=<(ScaleByAdamState, " in text and "key=key<fry>[]" in text
    assert "Array(" not in text and not re.search(r"\d\.\d", text)


def test_a_batched_result_lists_one_value_per_member():
    family = vijax.mean_field()
    keys = jax.random.split(jax.random.key(1), 3)
    batched = vijax.fit_batched(keys, family, _log_joint, family.init(jnp.zeros(5)),
                                optimizer=optax.adam(0.05), num_steps=40, progress=False)
    text = repr(batched)
    assert len(text) < 400, text
    assert text.startswith("FitResult(members=3, steps=40, elbo=[")
    assert "(mean of the last 40 steps' estimates, per member)" in text
    assert "skipped=[0, 0, 0]" in text
    assert "MeanFieldParams(loc: float32[3,5], raw_scale: float32[3,5])" in text
    elbos = re.search(r"elbo=\[([^\]]*)\]", text).group(1).split(", ")
    np.testing.assert_allclose([float(e) for e in elbos],
                               np.asarray(batched.trace.elbo).mean(1), rtol=1e-4)
    assert repr(batched.state).startswith("FitState(step=40, ")


def test_many_members_are_elided():
    params = vijax.mean_field().init(jnp.zeros(2))
    info = vijax.FitInfo(elbo=jnp.zeros((20, 7)), grad_norm=jnp.zeros((20, 7)),
                         skipped=jnp.zeros((20, 7), bool))
    text = repr(vijax.FitResult(params, None, info, num_skipped=np.arange(20)))
    assert "members=20, steps=7" in text and "skipped=[0, 1, 2, ..., 18, 19]" in text


def test_an_empty_trace_or_missing_fields_still_print(result):
    empty = jax.tree_util.tree_map(lambda x: x[:0], result.trace)
    text = repr(result._replace(trace=empty))
    assert text.startswith("FitResult(steps=150 (0 in this call), skipped=0, ")
    assert "elbo" not in text
    bare = repr(vijax.FitResult(params=result.params, state=None, trace=None))
    assert bare.startswith("FitResult(skipped=0, stopped_early=False, interrupted=False, params=")
    # Every estimate non-finite (every step skipped): the ELBO reads nan.
    skipped = result.trace._replace(elbo=jnp.full(3, jnp.nan))
    assert "elbo=nan" in repr(vijax.FitResult(result.params, None, skipped, num_skipped=3))
    # Whatever a field holds, repr does not raise.
    odd = vijax.FitResult(params=object(), state="?", trace=(1, 2), num_skipped=None)
    assert repr(odd).startswith("FitResult(")


def test_a_traced_result_prints_shapes_without_reading_values(result):
    seen = []

    def f(params):
        seen.append(repr(vijax.FitResult(params, result.state._replace(params=params),
                                         result.trace)))
        return params

    jax.jit(f)(result.params)
    assert "params=MeanFieldParams(loc: float32[5], raw_scale: float32[5])" in seen[0]


def test_a_long_parameter_pytree_is_elided():
    latent = {f"x{i}": jnp.zeros(3) for i in range(40)}
    params = vijax.mean_field().init(latent)
    text = repr(vijax.FitResult(params, None, None))
    assert len(text) < 400, text
    assert "params=MeanFieldParams(loc: {x0: float32[3], x1: float32[3]," in text
    assert text.endswith(", ...}, ...))") and "x39" not in text
    flow = vijax.flows.affine_coupling(num_layers=2)
    text = repr(vijax.FitResult(flow.init(jnp.zeros(4)), None, None))
    assert "params=FlowParams(base: FullRankParams(loc: float32[4]" in text
    assert "layers: {" in text and "float32[2," in text


def test_an_exact_fit_result_prints_in_one_line():
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    model = vijax.models.logistic_regression(x, (x[:, 0] > 0).astype(np.float32))
    family = vijax.mean_field()
    result = vijax.fit_exact(family, model, family.init(model.latent))
    text = repr(result)
    assert text.startswith(f"ExactFitResult(elbo={result.elbo:.6g}, converged=True, ")
    assert "params=MeanFieldParams(loc: float32[3], raw_scale: float32[3])" in text
    assert f"trace=<{result.num_steps} ELBOs>" in text and "\n" not in text
