"""vijax.diagnostics._plots: plot_trace and plot_marginals, read back from the figures."""

import matplotlib

matplotlib.use("Agg")

import sys  # noqa: E402
import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import vijax  # noqa: E402
from vijax.diagnostics._plots import plot_marginals, plot_trace  # noqa: E402
from vijax.fitting._types import FitInfo, FitResult, FitState  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _running_mean(elbo, skipped, window):
    # Straight from the definition: the mean of the finite, non-skipped
    # estimates among the `window` steps ending at t (NaN when none).
    out = np.full(len(elbo), np.nan)
    for t in range(len(elbo)):
        e = np.asarray(elbo[max(0, t - window + 1):t + 1], np.float64)
        ok = np.isfinite(e) & ~np.asarray(skipped[max(0, t - window + 1):t + 1])
        if ok.any():
            out[t] = e[ok].mean()
    return out


def _normal_mean():
    return vijax.models.normal_mean(
        jnp.array([0.5, 1.0, 1.5]), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0
    )


def _hand_trace(dtype=np.float64, n=60):
    rng = np.random.default_rng(0)
    elbo = (-50.0 * np.exp(-np.arange(n) / 8.0) - 3.0 + 0.1 * rng.normal(size=n)).astype(dtype)
    grad = (np.exp(-np.arange(n) / 20.0) + 0.01).astype(dtype)
    skipped = np.zeros(n, bool)
    skipped[[i for i in (10, 11, 2 * n // 3) if i < n]] = True
    elbo[10:12] = np.nan  # a non-finite loss...
    grad[10:12] = np.inf
    # ...and step 2n/3 skipped for its update only: a finite ELBO the mean leaves out.
    return FitInfo(jnp.asarray(elbo), jnp.asarray(grad), jnp.asarray(skipped))


# ---------------------------------------------------------------------------
# plot_trace
# ---------------------------------------------------------------------------


def test_trace_of_a_fit_shows_the_elbo_its_running_mean_and_the_gradient_norm():
    model, family = _normal_mean(), vijax.mean_field()
    result = vijax.fit(jax.random.key(0), family, model.log_joint, family.init(model.latent),
                       optimizer=optax.adam(0.05), num_steps=60, progress=False)
    fig = plot_trace(result)
    assert isinstance(fig, matplotlib.figure.Figure)
    ax_elbo, ax_grad = fig.axes
    assert (len(ax_elbo.lines), len(ax_grad.lines)) == (2, 1)
    raw, mean = ax_elbo.lines
    elbo = np.asarray(result.trace.elbo, np.float64)
    np.testing.assert_array_equal(raw.get_xdata(), np.arange(60))
    np.testing.assert_allclose(raw.get_ydata(), elbo)
    # The default window: about 5% of the steps, 3 here.
    want = _running_mean(elbo, np.asarray(result.trace.skipped), 3)
    np.testing.assert_allclose(mean.get_ydata(), want, rtol=1e-12)
    np.testing.assert_allclose(ax_grad.lines[0].get_ydata(), np.asarray(result.trace.grad_norm))
    assert ax_grad.get_yscale() == "log"
    labels = [t.get_text() for t in ax_elbo.get_legend().get_texts()]
    assert labels == ["ELBO estimate", "running mean (3 steps)"]
    assert not ax_elbo.collections and not ax_grad.collections  # nothing skipped


def test_skipped_steps_are_ticked_on_both_panels_and_left_out_of_the_mean(dtype):
    trace = _hand_trace(dtype)
    fig = plot_trace(trace, window=7)
    ax_elbo, ax_grad = fig.axes
    want = _running_mean(np.asarray(trace.elbo, np.float64), np.asarray(trace.skipped), 7)
    got = ax_elbo.lines[1].get_ydata()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.all(np.isfinite(got))  # every window of 7 holds a valid step
    # The step skipped for its update (40) is out of the mean though finite.
    assert got[40] == pytest.approx(np.mean(np.asarray(trace.elbo, np.float64)[34:40]))
    # Non-finite values leave gaps.
    assert np.isnan(ax_elbo.lines[0].get_ydata()[[10, 11]]).all()
    assert np.isnan(ax_grad.lines[0].get_ydata()[[10, 11]]).all()
    for ax in (ax_elbo, ax_grad):
        (ticks,) = ax.collections
        xs = sorted({float(seg[0, 0]) for seg in ticks.get_segments()})
        assert xs == [10.0, 11.0, 40.0]
    labels = [t.get_text() for t in ax_elbo.get_legend().get_texts()]
    assert labels[-1] == "skipped steps (3)"
    # The y axis keeps the later half in view: the early transient (-53) is cut.
    bottom, top = ax_elbo.get_ylim()
    assert bottom > -53 and top >= np.nanmax(np.asarray(trace.elbo, np.float64))


def test_a_continued_fit_counts_steps_from_its_state_and_axes_can_be_given():
    trace = _hand_trace(n=30)
    state = FitState(params=None, opt_state=(), step=jnp.asarray(130), key=jax.random.key(0))
    result = FitResult(params=None, state=state, trace=trace, num_skipped=3)
    fig, axes = plt.subplots(1, 2)
    assert plot_trace(result, axes=axes) is fig
    np.testing.assert_array_equal(axes[0].lines[0].get_xdata(), np.arange(100, 130))
    assert [len(a.lines) for a in axes] == [2, 1]
    # The bare trace counts from 0.
    fig = plot_trace(trace)
    assert fig.axes[0].lines[0].get_xdata()[0] == 0


def test_a_batched_trace_draws_one_line_per_member():
    model, family = _normal_mean(), vijax.mean_field()
    result = vijax.fit_batched(
        jax.random.split(jax.random.key(0), 3), family, model.log_joint,
        family.init(model.latent), optimizer=optax.adam(0.05), num_steps=40, progress=False,
    )
    fig = plot_trace(result, window=4)
    ax_elbo, ax_grad = fig.axes
    assert (len(ax_elbo.lines), len(ax_grad.lines)) == (6, 3)
    elbo, skipped = np.asarray(result.trace.elbo, np.float64), np.asarray(result.trace.skipped)
    means = ax_elbo.lines[1::2]
    for b in range(3):
        np.testing.assert_allclose(means[b].get_ydata(), _running_mean(elbo[b], skipped[b], 4),
                                   rtol=1e-12)
        assert means[b].get_color() == ax_grad.lines[b].get_color()
    labels = [t.get_text() for t in ax_elbo.get_legend().get_texts()]
    assert labels == ["member 0", "member 1", "member 2"]
    assert ax_elbo.get_legend().get_title().get_text() == "running mean (4 steps)"

    # A hand-made batch with skipped steps in member 1 only: ticks in its colour.
    one = _hand_trace(n=20)
    clean = FitInfo(one.elbo, one.grad_norm, jnp.zeros(20, bool))
    both = FitInfo(*(jnp.stack([a, b]) for a, b in zip(clean, one)))
    fig = plot_trace(both)
    (ticks,) = fig.axes[0].collections
    colors = {tuple(c) for c in ticks.get_colors()}
    assert colors == {matplotlib.colors.to_rgba("C1")}
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts[-1] == "skipped steps (3 in 1 member)"


def test_plot_trace_errors_name_the_argument():
    trace = _hand_trace(n=10)
    with pytest.raises(TypeError, match=r"`result` must be a vijax.FitResult .* got dict"):
        plot_trace({"elbo": trace.elbo})
    with pytest.raises(ValueError, match=r"`window` must be an int >= 1; got 0"):
        plot_trace(trace, window=0)
    with pytest.raises(TypeError, match=r"`window` must be an int >= 1; got 2.5"):
        plot_trace(trace, window=2.5)
    _, axes = plt.subplots(1, 3)
    with pytest.raises(ValueError, match=r"`axes` must hold 2 matplotlib Axes"):
        plot_trace(trace, axes=axes)
    with pytest.raises(TypeError, match=r"`axes` must be None or a sequence of 2"):
        plot_trace(trace, axes=axes[0])
    with pytest.raises(ValueError, match=r"empty trace"):
        plot_trace(FitInfo(np.zeros(0), np.zeros(0), np.zeros(0, bool)))
    with pytest.raises(ValueError, match=r"`grad_norm` must have the shape of its `elbo`, \(10,\)"):
        plot_trace(FitInfo(trace.elbo, trace.grad_norm[:5], trace.skipped))
    with pytest.raises(ValueError, match=r"\(members, steps\)"):
        plot_trace(FitInfo(*(jnp.zeros((2, 2, 3)) for _ in range(3))))


# ---------------------------------------------------------------------------
# plot_marginals
# ---------------------------------------------------------------------------


def params_dtype(params):
    return jax.tree_util.tree_leaves(params)[0].dtype


def _eight_schools():
    model, family = vijax.models.eight_schools(), vijax.mean_field()
    return model, family, family.init(model.latent)


def _panel(fig, title):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def test_marginals_overlay_the_reference_on_the_same_bins():
    model, family, params = _eight_schools()
    rng = np.random.default_rng(1)
    reference = {"tau": np.exp(rng.normal(size=3000)), "theta": rng.normal(2.0, 3.0, (3000, 8))}
    fig = plot_marginals(jax.random.key(0), params, family, model, reference=reference,
                         num_samples=1000, max_panels=12)
    # 18 elements (eta[8], mu, tau, theta[8]): the first 12, said in the title.
    assert len(fig.axes) == 12
    assert "the first 12 of 18 elements" in fig.get_suptitle()
    assert [ax.get_title() for ax in fig.axes[7:11]] == ["eta[7]", "mu", "tau", "theta[0]"]
    assert len(_panel(fig, "mu").patches) == 1  # no reference for mu
    ax = _panel(fig, "theta[1]")
    assert len(ax.patches) == 2
    (q_density, q_edges), (r_density, r_edges) = (p.get_data()[:2] for p in ax.patches)
    np.testing.assert_array_equal(q_edges, r_edges)
    # The reference's histogram: a density over all its draws.
    counts = np.histogram(reference["theta"][:, 1], r_edges)[0]
    np.testing.assert_allclose(r_density, counts / (3000 * np.diff(r_edges)))
    assert 0.97 < np.sum(q_density * np.diff(q_edges)) <= 1.0 + 1e-9
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["q", "reference"]


def test_names_choose_the_panels_and_a_leaf_name_stands_for_its_elements():
    model, family, params = _eight_schools()
    # names= shows what it names, in its order, whatever max_panels says.
    fig = plot_marginals(jax.random.key(0), params, family, model, num_samples=200,
                         names=["tau", "theta", "theta[2]"], max_panels=3)
    assert [ax.get_title() for ax in fig.axes] == ["tau"] + [f"theta[{j}]" for j in range(8)]
    assert fig.get_suptitle() == "marginals of q (200 draws)"


def test_reference_from_an_inference_data_and_weights(dtype):
    model, family = _normal_mean(), vijax.mean_field()  # float64 under the x64 fixture
    params = family.init(model.latent)
    assert params_dtype(params) == dtype
    rng = np.random.default_rng(2)
    draws = rng.normal(1.0, 0.5, (2, 500))  # (chain, draw), the ArviZ layout
    idata = types.SimpleNamespace(posterior={"z": draws, "log_lik": np.zeros((2, 500))})
    fig = plot_marginals(jax.random.key(0), params, family, model, reference=idata,
                         num_samples=300)
    (ax,) = fig.axes
    assert ax.get_title() == "z"
    r_density, edges = ax.patches[1].get_data()[:2]
    counts = np.histogram(draws.ravel(), edges)[0]
    np.testing.assert_allclose(r_density, counts / (1000 * np.diff(edges)))
    # Weights: the second chain weighted 0 gives the first chain's histogram.
    weights = np.concatenate([np.ones(500), np.zeros(500)])
    fig = plot_marginals(jax.random.key(0), params, family, model, reference=idata,
                         num_samples=300, weights=weights)
    r_density, edges = fig.axes[0].patches[1].get_data()[:2]
    counts = np.histogram(draws[0], edges)[0]
    np.testing.assert_allclose(r_density, counts / (500 * np.diff(edges)))


def test_reference_from_arviz():
    arviz = pytest.importorskip("arviz")
    model, family, params = _eight_schools()
    rng = np.random.default_rng(3)
    idata = arviz.from_dict(posterior={"mu": rng.normal(size=(2, 100)),
                                       "theta": rng.normal(size=(2, 100, 8))})
    fig = plot_marginals(jax.random.key(0), params, family, model, reference=idata,
                         num_samples=200, names=["mu", "theta[7]", "tau"])
    assert [len(ax.patches) for ax in fig.axes] == [2, 2, 1]
    edges = fig.axes[1].patches[1].get_data()[1]
    counts = np.histogram(idata.posterior["theta"].values[..., 7].ravel(), edges)[0]
    np.testing.assert_allclose(fig.axes[1].patches[1].get_data()[0],
                               counts / (200 * np.diff(edges)))


def test_plot_marginals_errors_list_what_is_available():
    model, family, params = _eight_schools()
    key = jax.random.key(0)

    def call(**kwargs):
        return plot_marginals(key, params, family, model, num_samples=50, **kwargs)

    with pytest.raises(ValueError, match=r"`reference` has names \['sigma'\] .* available "
                                         r"names are \['eta', 'mu', 'tau', 'theta'\]"):
        call(reference={"sigma": np.ones(10)})
    with pytest.raises(ValueError, match=r"`reference\['theta'\]` must have shape "
                                         r"\(draws, \*\(8,\)\) .* got shape \(10, 7\)"):
        call(reference={"theta": np.ones((10, 7))})
    with pytest.raises(ValueError, match=r"none of q's variables: q's are \['eta', 'mu', "
                                         r"'tau', 'theta'\]; the posterior's are \['sigma'\]"):
        call(reference=types.SimpleNamespace(posterior={"sigma": np.ones((1, 10))}))
    with pytest.raises(TypeError, match=r"`reference` must be None, a dict .* got list"):
        call(reference=[np.ones(10)])
    with pytest.raises(ValueError, match=r"`names` has 'thet', .* available names are "
                                         r"\['eta\[0\]'"):
        call(names=["thet"])
    with pytest.raises(ValueError, match=r"`max_panels` must be an int >= 1; got 0"):
        call(max_panels=0)
    with pytest.raises(ValueError, match=r"`weights` weigh the reference draws"):
        call(weights=np.ones(10))
    with pytest.raises(ValueError, match=r"`weights` must have shape \(10,\)"):
        call(reference={"mu": np.ones(10)}, weights=np.ones(9))
    with pytest.raises(ValueError, match=r"`weights` must be finite and >= 0"):
        call(reference={"mu": np.ones(10)}, weights=-np.ones(10))


def test_a_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"vijax.plot_trace needs matplotlib.*vijax\[plots\]"):
        plot_trace(_hand_trace(n=5))
    model, family, params = _eight_schools()
    with pytest.raises(ImportError, match=r"vijax.plot_marginals needs .*vijax\[plots\]"):
        plot_marginals(jax.random.key(0), params, family, model)
