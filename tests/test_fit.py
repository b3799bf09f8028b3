"""fit(), FitResult and ArviZ export on the hierarchical PK model of the model zoo."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
import xarray as xr
from pyro.infer import Trace_ELBO

import pyro_hds
from pyro_hds.models import pk_oral


@pytest.fixture(scope="module")
def small_data():
    data, truth = pk_oral.simulate(num_groups=3, per_group=6, seed=3)
    return data, truth


def _fit(data, steps=30, **kw):
    kw.setdefault("objective", pyro_hds.IWAE(num_particles=4))
    kw.setdefault("batch_size", 9)
    return pyro_hds.fit(pk_oral.model, data, num_steps=steps, progress=False, **kw)


def _params():
    store = pyro.get_param_store()
    return {k: store._params[k].detach().clone() for k in store.keys()}


def test_seed_determinism(small_data):
    data, _ = small_data
    _fit(data, seed=5)
    first = _params()
    pyro.clear_param_store()
    _fit(data, seed=5)
    second = _params()
    assert first.keys() == second.keys()
    for k in first:
        torch.testing.assert_close(first[k], second[k], rtol=0, atol=0)


class _Killed(Exception):
    pass


def _uninterrupted_then_killed(data, ckpt, kill_at: int, **kw) -> dict[str, torch.Tensor]:
    """Fit with ``kw`` uninterrupted and return its parameters; then fit again with the
    checkpoint ``ckpt``, killed at step ``kill_at`` (the store is cleared between)."""
    _fit(data, **kw)
    uninterrupted = _params()
    pyro.clear_param_store()

    def kill(step, loss):
        if step == kill_at:
            raise _Killed

    with pytest.raises(_Killed):
        _fit(data, checkpoint=ckpt, callback=kill, **kw)
    pyro.clear_param_store()
    return uninterrupted


def test_resume_reproduces_uninterrupted_fit(small_data, tmp_path):
    data, _ = small_data
    ckpt = tmp_path / "ckpt.pt"
    uninterrupted = _uninterrupted_then_killed(data, ckpt, 14, steps=24, seed=2, checkpoint_every=6)
    assert torch.load(ckpt, weights_only=True)["step"] == 12
    result = _fit(data, steps=24, seed=2, checkpoint=ckpt, resume=True)
    resumed = _params()
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=0)
    assert result.history["step"] == list(range(24))
    # no temporary files left behind by the atomic writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_average_last_returns_the_mean_of_the_last_iterates(small_data):
    data, _ = small_data
    seen = []
    _fit(data, steps=12, seed=3, average_last=0.25, callback=lambda s, loss: seen.append(_params()))
    averaged = _params()
    last = seen[-1]
    # M = round(0.25 * 12) = 3: the parameters after steps 10, 11 and 12
    for k in averaged:
        mean = torch.stack([p[k] for p in seen[-3:]]).mean(0)
        # a running mean against a direct one: float32 round-off of three additions
        torch.testing.assert_close(averaged[k], mean, rtol=1e-5, atol=1e-6)
    moved = [k for k in averaged if not torch.equal(averaged[k], last[k])]
    assert moved, "the averaged parameters equal the last iterate"
    with pytest.raises(ValueError, match="average_last"):
        _fit(data, steps=2, average_last=1.5)


def test_resume_with_averaging_reproduces_uninterrupted_fit(small_data, tmp_path):
    data, _ = small_data
    ckpt = tmp_path / "avg.pt"
    uninterrupted = _uninterrupted_then_killed(
        data, ckpt, 18, steps=24, seed=2, average_last=0.5, checkpoint_every=4
    )
    state = torch.load(ckpt, weights_only=True)
    assert (state["step"], state["averaged_steps"]) == (16, 4)
    _fit(data, steps=24, seed=2, average_last=0.5, checkpoint=ckpt, resume=True)
    for k, v in _params().items():
        torch.testing.assert_close(v, uninterrupted[k], rtol=0, atol=0)


def test_adam_matches_torch_optim_bit_for_bit():
    from pyro_hds.fit import _Adam, _lr_factor

    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    theirs = [p.clone() for p in ours]
    base = 0.05
    adam = _Adam(ours)
    reference = torch.optim.Adam(theirs, lr=base)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        reference, lambda s: _lr_factor("exponential", s, 10, 0.1, 2)
    )
    for step in range(10):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for i, (a, b, g) in enumerate(zip(ours, theirs, grads)):
            # the second tensor gets no gradient before step 3: its own step count starts there
            a.grad = None if i == 1 and step < 3 else g.clone()
            b.grad = None if i == 1 and step < 3 else g.clone()
        adam.step(base * _lr_factor("exponential", step, 10, 0.1, 2))
        reference.step()
        schedule.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), f"step {step}"
    assert adam.steps == [10, 7]


def test_resume_from_a_checkpoint_of_format_1(small_data, tmp_path):
    """Checkpoints written while fit() used torch.optim.Adam (format 1) still resume exactly."""
    data, _ = small_data
    ckpt = tmp_path / "old.pt"
    uninterrupted = _uninterrupted_then_killed(data, ckpt, 10, steps=16, seed=4, checkpoint_every=8)
    state = torch.load(ckpt, weights_only=True)
    adam = state.pop("adam")
    # torch.optim.Adam's state dict: per-parameter entries keyed by index, float step tensors
    per_param = {
        i: {"step": torch.tensor(float(t)), "exp_avg": m, "exp_avg_sq": v}
        for i, (t, m, v) in enumerate(zip(adam["steps"], adam["exp_avg"], adam["exp_avg_sq"]))
        if m is not None
    }
    state["optimizer"] = {"state": per_param, "param_groups": [{"lr": 0.01}]}
    state["scheduler"] = {"last_epoch": state["step"]}
    state["format"] = 1
    torch.save(state, ckpt)
    pyro.clear_param_store()
    _fit(data, steps=16, seed=4, checkpoint=ckpt, resume=True)
    for k, v in _params().items():
        torch.testing.assert_close(v, uninterrupted[k], rtol=0, atol=0)


def test_fit_leaves_torch_dynamo_unimported():
    """torch.optim imports torch._dynamo (about a second) when an optimizer is built; fit()
    with default options must not pay for it."""
    import subprocess
    import sys

    code = (
        "import sys, pyro_hds\n"
        "from pyro_hds.models import pk_oral\n"
        "data, _ = pk_oral.simulate(num_groups=2, per_group=3, seed=0)\n"
        "pyro_hds.fit(pk_oral.model, data, num_steps=2, progress=False, seed=0)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_checkpoint_loads_without_pickle(small_data, tmp_path):
    data, _ = small_data
    ckpt = tmp_path / "c.pt"
    _fit(data, steps=3, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 3


def test_bad_arguments(small_data):
    data, _ = small_data
    with pytest.raises(ValueError, match="batch_size"):
        _fit(data, batch_size=1000)
    with pytest.raises(ValueError, match="lr_schedule"):
        _fit(data, lr_schedule="triangle")


def test_trace_elbo_trains_the_same_model_and_guide(small_data):
    data, _ = small_data
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    result = _fit(data, steps=60, objective=elbo, seed=0, lr=0.02)
    losses = result.history["loss"]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_validation_is_logged(small_data):
    data, _ = small_data
    result = _fit(
        data[torch.arange(12)],
        steps=10,
        validation=data[torch.arange(12, 18)],
        validate_every=5,
        validation_particles=8,
    )
    assert result.history["val_step"] == [5, 10]
    assert all(math.isfinite(v) for v in result.history["val_bound"])


def test_posterior_shapes_and_arviz(small_data, tmp_path):
    from arviz_stats import ess, loo, summary

    data, _ = small_data
    result = _fit(data, steps=20)
    post = result.posterior(num_samples=40, num_particles=8)
    n, t = len(data), data.num_times
    assert post.samples["ka_pop"].shape == (40,)
    assert post.samples["cl_group"].shape == (40, 3)
    assert post.samples["ka"].shape == (40, n)
    assert post.samples["x"].shape == (40, n, t, 2)
    assert post.predictive["y"].shape == (40, n, t, 1)
    assert post.log_likelihood["y"].shape == (40, n)
    assert post.log_likelihood["y"].dtype == torch.float64
    assert post.pareto_k.shape == (n,) and post.ess.shape == (n,)
    assert torch.all((post.ess >= 1 - 1e-9) & (post.ess <= 8 + 1e-9))
    tree = result.to_arviz(num_samples=40, num_particles=8)
    for group in (
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
        "constant_data",
    ):
        assert group in tree.children, group
    posterior = tree["posterior"]
    assert posterior["ka"].dims == ("chain", "draw", "individual")
    assert posterior["cl_group"].dims == ("chain", "draw", "group")
    assert list(posterior["cl_group"].coords["group"].values) == list(data.group_names)
    assert posterior["x"].dims == ("chain", "draw", "individual", "time", "x_state")
    assert tree["log_likelihood"]["y"].dtype == "float64"
    assert tree["sample_stats"]["pareto_k"].dims == ("individual",)
    table = summary(tree, var_names=["ka_pop", "cl_pop"])
    assert table.shape[0] == 2
    assert ess(tree, var_names=["ka_pop"])["ka_pop"] > 0
    elpd = loo(tree)
    assert math.isfinite(float(elpd.elpd))
    path = tmp_path / "post.nc"
    tree.to_netcdf(path)
    back = xr.open_datatree(path)
    xr.testing.assert_allclose(back["posterior"]["ka"], posterior["ka"])
    assert list(back["posterior"].coords["individual"].values) == list(data.individual_ids)


def test_save_and_load_roundtrip(small_data, tmp_path):
    data, _ = small_data
    result = _fit(data, steps=10)
    before = _params()
    path = tmp_path / "fit.pt"
    result.save(path)
    pyro.clear_param_store()
    loaded = pyro_hds.load(path, pk_oral.model)
    after = _params()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k])
    assert loaded.history["loss"] == result.history["loss"]
    assert loaded.data.individual_ids == data.individual_ids
    post = loaded.posterior(num_samples=5, num_particles=2)
    assert post.samples["ka"].shape == (5, len(data))


def test_nonfinite_loss_names_the_site(small_data):
    data, _ = small_data

    def broken(data):
        pk_oral.model(data)
        pyro.sample(
            "bad", pyro.distributions.Normal(torch.tensor(math.nan), 1.0), obs=torch.tensor(0.0)
        )

    pyro.enable_validation(False)
    with pytest.raises(pyro_hds.NonFiniteLossError, match="bad"):
        pyro_hds.fit(
            broken, data, num_steps=2, progress=False, objective=pyro_hds.IWAE(num_particles=2)
        )


def test_a_subset_is_fitted_as_a_whole_training_set(small_data):
    # data[train] remembers that it was cut from 18 individuals; fit() must scale its
    # minibatches by the 12 it was given, exactly as for the same 12 built on their own
    data, _ = small_data
    train = data[torch.arange(6, 18)]
    alone = train.replace(total_size=12, indices=torch.arange(12))
    _fit(train, steps=3, seed=2)
    cut = _params()
    pyro.clear_param_store()
    _fit(alone, steps=3, seed=2)
    whole = _params()
    for k in cut:
        torch.testing.assert_close(cut[k], whole[k], rtol=0, atol=0)


def test_encode_draws_from_the_guide_without_the_model(small_data):
    data, _ = small_data
    result = _fit(data, steps=20, seed=4)
    new, _ = pk_oral.simulate(num_groups=3, per_group=2, seed=8)

    def no_model(*args, **kwargs):
        raise AssertionError("encode() must not run the model")

    result.model = no_model
    draws = result.encode(new, num_samples=4000, seed=0)
    assert draws["ka_pop"].shape == (4000,) and draws["cl_group"].shape == (4000, 3)
    assert draws["cl"].shape == (4000, 6)
    loc, scale = result.guide.local_distributions(new)["cl"]
    log_cl = draws["cl"].log()
    # 5 Monte Carlo standard errors of a mean (scale / sqrt(n)) and of an SD (scale / sqrt(2n))
    assert ((log_cl.mean(0) - loc).abs() < 5 * scale / math.sqrt(4000)).all()
    assert ((log_cl.std(0) - scale).abs() < 5 * scale / math.sqrt(2 * 4000)).all()
    with pytest.raises(ValueError, match="num_samples"):
        result.encode(new, num_samples=0)


def test_results_keep_their_parameters_and_fits_do_not_leak(small_data):
    data, _ = small_data
    first = _fit(data, steps=10, seed=6)
    before = first.encode(data, num_samples=5, seed=0)["cl"]
    fresh = _params()
    # a second fit of the same model and settings starts from scratch: same parameters
    second = _fit(data, steps=10, seed=6)
    again = _params()
    for k in fresh:
        torch.testing.assert_close(again[k], fresh[k], rtol=0, atol=0)
    # a different fit, then clearing the store: the first result still computes the same
    _fit(data, steps=15, seed=9)
    pyro.clear_param_store()
    after = first.encode(data, num_samples=5, seed=0)["cl"]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert second.encode(data, num_samples=5, seed=0)["cl"].shape == before.shape
    with first.parameters():
        assert set(pyro.get_param_store().keys()) == set(fresh)


def test_pareto_k_of_degenerate_weights_is_inf_not_an_error():
    """Most particles failed (weight 0) or a tail of equal weights: PSIS cannot fit the tail;
    that individual's k-hat is inf, the others' are computed as usual, and nothing warns."""
    import warnings

    import numpy as np

    from pyro_hds.results import _pareto_k

    gen = np.random.default_rng(0)
    lw = np.empty((4, 1024))
    # Pareto weights w = U^(-0.3): tail index k = 0.3 (PSIS's standard error with a tail of
    # 96 draws is about (1 + k) / sqrt(96) = 0.13)
    lw[0] = -0.3 * np.log(gen.uniform(size=1024))
    lw[1, 50:] = -np.inf  # 50 nonzero weights, fewer than the tail's 96 draws
    lw[2, :] = 0.0  # all weights equal
    lw[3, :] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        khat = _pareto_k(torch.tensor(lw))
    assert khat.shape == (4,)
    assert abs(float(khat[0]) - 0.3) < 3 * 0.13
    assert math.isinf(float(khat[1])) and math.isinf(float(khat[3]))
    assert math.isinf(float(khat[2])) or float(khat[2]) < 0.5


@pytest.mark.parametrize("k", [25, 64, 300])
def test_pareto_k_matches_arviz_psis_row_by_row(k):
    """The vectorized k-hat is ArviZ's PSIS estimate (the reference implementation) for every
    row: Pareto tails of several shapes and a light (log-normal) tail, K on both sides of
    PSIS's switch from K / 5 to 3 sqrt(K) tail draws."""
    import numpy as np
    from arviz_stats.base import array_stats

    from pyro_hds.results import _pareto_k

    gen = np.random.default_rng(k)
    shapes = [0.1, 0.3, 0.6, 0.9, 1.4]
    lw = np.concatenate(
        [-s * np.log(gen.uniform(size=(8, k))) for s in shapes] + [3 * gen.normal(size=(8, k))]
    )
    reference = np.asarray(array_stats.psislw(-lw, r_eff=1.0, axis=-1)[1])
    khat = _pareto_k(torch.tensor(lw).reshape(6, 8, k))
    assert khat.shape == (6, 8)
    np.testing.assert_allclose(khat.reshape(-1).numpy(), reference, rtol=1e-12, atol=1e-12)


def test_long_lived_objects_are_kept_from_the_collector_during_a_fit(small_data):
    # after the first step, the objects alive then sit in the permanent generation (full
    # collections do not walk them); the fit returns them, even when it fails, and leaves a
    # caller's own frozen objects alone
    import gc

    data, _ = small_data
    assert gc.get_freeze_count() == 0
    seen: list[int] = []
    _fit(data, steps=4, callback=lambda step, loss: seen.append(gc.get_freeze_count()))
    assert seen[0] == 0 and all(count > 0 for count in seen[1:])
    assert gc.get_freeze_count() == 0

    def fail(step, loss):
        if step == 2:
            raise _Killed

    with pytest.raises(_Killed):
        _fit(data, steps=4, callback=fail)
    assert gc.get_freeze_count() == 0

    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        seen.clear()
        _fit(data, steps=3, callback=lambda step, loss: seen.append(gc.get_freeze_count()))
        # frozen objects that die are freed as usual, so the count can only fall; a freeze by
        # the fit would add the objects of its first step, an unfreeze would empty it
        assert all(0 < count <= mine for count in [*seen, gc.get_freeze_count()])
    finally:
        gc.unfreeze()


def _positive_data(n=12, t=6):
    gen = torch.Generator().manual_seed(1)
    times = torch.linspace(0.1, 1.0, t)
    y = torch.exp(0.3 * torch.randn(n, t, 1, generator=gen))
    return pyro_hds.Dataset.from_arrays(y, times)


def _positive_model(data):
    mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 1.0))
    with pyro_hds.individuals(data):
        z = pyro.sample("z", pyro.distributions.Normal(mu, 0.5))
        loc = z[..., None, None] * data.times[:, None]
        pyro_hds.observe("y", pyro.distributions.LogNormal(loc, 0.3), data)


def test_fit_checks_every_individual_once_then_trains_without_checks():
    from pyro.infer.util import is_validation_enabled

    data = _positive_data()
    states: list[bool] = []

    def record(step, loss):
        states.append(is_validation_enabled())

    kw = dict(objective=pyro_hds.IWAE(num_particles=3), batch_size=4, progress=False)
    pyro_hds.fit(_positive_model, data, num_steps=3, callback=record, **kw)
    assert states == [False] * 3 and is_validation_enabled()  # restored afterwards
    states.clear()
    pyro_hds.fit(_positive_model, data, num_steps=3, callback=record, check_every_step=True, **kw)
    assert states == [True] * 3
    # an observation outside its site's support in an individual that the first minibatch
    # (individuals 0-3) lacks stops the fit before it trains, naming the site
    bad = _positive_data()
    bad.observations[10, 2, 0] = -1.0
    with pytest.raises(ValueError, match="'y'"):
        pyro_hds.fit(_positive_model, bad, num_steps=3, **kw)
    # the check leaves the generators alone: the same fit as without it
    pyro_hds.fit(_positive_model, data, num_steps=3, seed=3, **kw)
    quiet = _params()
    with pyro.validation_enabled(False):
        pyro_hds.fit(_positive_model, data, num_steps=3, seed=3, **kw)
    unchecked = _params()
    for k in quiet:
        torch.testing.assert_close(quiet[k], unchecked[k], rtol=0, atol=0)


def test_a_callable_learning_rate_schedule(small_data):
    from pyro_hds.fit import _lr_factor

    data, _ = small_data
    calls: list[tuple[int, int]] = []

    def halve_at_3(step, num_steps):
        calls.append((step, num_steps))
        return 0.5 ** (step >= 3)

    _fit(data, steps=5, lr_schedule=halve_at_3)
    assert calls[0] == (0, 5)  # the check before training
    assert calls[1:] == [(s, 5) for s in range(5)]
    assert _lr_factor(halve_at_3, 2, 5, 0.1, 0) == 1.0
    assert _lr_factor(halve_at_3, 3, 5, 0.1, 0) == 0.5
    assert _lr_factor(halve_at_3, 0, 5, 0.1, 2) == 0.5  # warm-up first
    with pytest.raises(ValueError, match="positive, finite"):
        _fit(data, steps=2, lr_schedule=lambda s, n: 0.0)
