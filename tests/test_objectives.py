"""The hierarchical IWAE bound on a conjugate linear-Gaussian hierarchy with exact evidence.

Model (all Gaussian, so log p(Y) and every posterior conditional are exact):

    mu ~ N(0, tau^2);  g_j ~ N(mu, sg^2), j < G;  z_i ~ N(g_{c(i)}, sz^2);  y_it ~ N(z_i, sy^2).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_hds.objectives import IWAE, NonFiniteLossError

TAU, SG, SZ, SY = 2.0, 1.0, 0.5, 0.7
G, N, T = 3, 12, 4


def make_data(seed: int = 1) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    groups = torch.arange(N) % G
    mu = TAU * torch.randn((), generator=gen)
    g = mu + SG * torch.randn(G, generator=gen)
    z = g[groups] + SZ * torch.randn(N, generator=gen)
    y = z[:, None] + SY * torch.randn(N, T, generator=gen)
    return subset(SimpleNamespace(y=y, groups=groups, total_size=N), torch.arange(N))


def subset(full: SimpleNamespace, idx: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(
        y=full.y[idx],
        groups=full.groups[idx],
        indices=idx,
        total_size=N,
        individual_ids=[f"well{int(i)}" for i in idx],
    )


def model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, TAU))
    with pyro.plate("groups", G, dim=-1):
        g = pyro.sample("g", dist.Normal(mu, SG))
    with pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1):
        gi = g[..., data.groups]
        z = pyro.sample("z", dist.Normal(gi, SZ))
        pyro.sample("y", dist.Normal(z.unsqueeze(-1), SY).to_event(1), obs=data.y)


def exact_log_evidence(data) -> float:
    """log N(vec Y; 0, tau^2 11' + sg^2 AA' + sz^2 BB' + sy^2 I)."""
    a = torch.nn.functional.one_hot(data.groups, G).double().repeat_interleave(T, 0)
    b = torch.eye(N, dtype=torch.float64).repeat_interleave(T, 0)
    cov = (
        TAU**2 * torch.ones(N * T, N * T)
        + SG**2 * a @ a.T
        + SZ**2 * b @ b.T
        + SY**2 * torch.eye(N * T)
    )
    mvn = torch.distributions.MultivariateNormal(torch.zeros(N * T), cov)
    return float(mvn.log_prob(data.y.reshape(-1)))


def exact_conditionals(data):
    """p(mu | Y) and the linear-Gaussian p(g | mu, Y) from the joint of (mu, g, Y)."""
    # v = (mu, g_1..g_G, y) = L eps with eps ~ N(0, I) over (mu, g-noise, z-noise, y-noise)
    groups = data.groups
    nv = 1 + G + N * T
    ne = 1 + G + N + N * T
    lmat = torch.zeros(nv, ne)
    lmat[0, 0] = TAU
    for j in range(G):
        lmat[1 + j, 0] = TAU
        lmat[1 + j, 1 + j] = SG
    for i in range(N):
        for t in range(T):
            r = 1 + G + i * T + t
            lmat[r, 0] = TAU
            lmat[r, 1 + int(groups[i])] = SG
            lmat[r, 1 + G + i] = SZ
            lmat[r, 1 + G + N + r - (1 + G)] = SY
    cov = lmat @ lmat.T
    y = data.y.reshape(-1)
    iy = slice(1 + G, nv)
    syy = cov[iy, iy]
    # p(mu | Y)
    smy = cov[0:1, iy]
    m_mu = (smy @ torch.linalg.solve(syy, y)).squeeze()
    v_mu = (cov[0, 0] - smy @ torch.linalg.solve(syy, smy.T)).squeeze()
    # p(g | mu, Y): condition on c = (mu, Y)
    ic = [0, *range(1 + G, nv)]
    scc = cov[ic][:, ic]
    sgc = cov[1 : 1 + G][:, ic]
    gain = torch.linalg.solve(scc, sgc.T).T  # (G, 1 + NT)
    offset = gain[:, 1:] @ y
    slope = gain[:, 0]
    vg = torch.diagonal(cov[1 : 1 + G, 1 : 1 + G] - gain @ sgc.T)
    return m_mu, v_mu.sqrt(), offset, slope, vg.sqrt()


def make_exact_guide(data_full):
    m_mu, s_mu, offset, slope, s_g = exact_conditionals(data_full)
    prec = 1 / SZ**2 + T / SY**2

    def guide(data):
        mu = pyro.sample("mu", dist.Normal(m_mu, s_mu))
        with pyro.plate("groups", G, dim=-1):
            g = pyro.sample("g", dist.Normal(offset + slope * mu, s_g))
        with pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1):
            gi = g[..., data.groups]
            loc = (gi / SZ**2 + data.y.sum(-1) / SY**2) / prec
            pyro.sample("z", dist.Normal(loc, prec**-0.5))

    return guide


def make_rough_guide(theta: torch.Tensor | None = None, exact_outer=None):
    """A deliberately inexact guide; theta = (mu loc, mu log-scale, g shift, z shrink, z log-scale).

    With ``exact_outer=data`` the globals and group latents come from their exact posterior, so
    the whole gap to log p(Y) is the locals' (inner) gap.
    """
    if theta is None:
        theta = torch.tensor([0.3, -0.5, 0.2, 0.8, -0.6])
    outer = exact_conditionals(exact_outer) if exact_outer is not None else None

    def guide(data):
        if outer is None:
            mu = pyro.sample("mu", dist.Normal(theta[0], theta[1].exp()))
            with pyro.plate("groups", G, dim=-1):
                pyro.sample("g", dist.Normal(mu + theta[2], 0.4))
        else:
            m_mu, s_mu, offset, slope, s_g = outer
            mu = pyro.sample("mu", dist.Normal(m_mu, s_mu))
            with pyro.plate("groups", G, dim=-1):
                pyro.sample("g", dist.Normal(offset + slope * mu, s_g))
        with pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1):
            pyro.sample("z", dist.Normal(theta[3] * data.y.mean(-1), theta[4].exp()))

    return guide


@pytest.mark.parametrize("validate", [True, False])
def test_exact_guide_gives_exact_evidence_every_draw(validate):
    # with q equal to the exact posterior every weight equals p(Y): no Monte Carlo error at all;
    # without validation the global normal sites (mu, g) take the grouped evaluation
    data = make_data()
    guide = make_exact_guide(data)
    logp = exact_log_evidence(data)
    for s, k in [(1, 1), (3, 5), (2, 64)]:
        with pyro.validation_enabled(validate):
            w = IWAE(num_particles=k, num_outer_particles=s).log_weights(model, guide, data)
        assert w.local.shape == (s, k, N)
        assert w.global_terms.shape == (s,)
        per_draw = w.scale * w.inner.sum(-1) + w.global_terms
        torch.testing.assert_close(per_draw, torch.full((s,), logp), rtol=0, atol=1e-9)


def test_minibatch_scaling_is_unbiased():
    # same outer draws (same seed, sampled first); the average over a partition of minibatches
    # of the N/B-scaled estimate equals the full-batch estimate
    data = make_data()
    guide = make_exact_guide(data)
    logp = exact_log_evidence(data)
    objective = IWAE(num_particles=4, max_plate_nesting=1)  # no guess pass: same draws
    estimates = []
    for idx in torch.arange(N).reshape(4, 3):
        pyro.set_rng_seed(7)
        w = objective.log_weights(model, guide, subset(data, idx))
        assert w.local.shape == (1, 4, 3)
        assert w.scale == pytest.approx(N / 3)
        estimates.append(float(w.bound))
    assert sum(estimates) / 4 == pytest.approx(logp, abs=1e-8)
    # and a single minibatch is not the full answer: the scale matters
    assert not any(abs(e - logp) < 1e-6 for e in estimates)


def _mean_and_se(objective, guide, data, reps):
    values = torch.tensor([-objective.loss(model, guide, data) for _ in range(reps)])
    return float(values.mean()), float(values.std() / math.sqrt(reps))


def test_bound_below_evidence_and_rises_with_k():
    data = make_data()
    logp = exact_log_evidence(data)
    for guide in (make_rough_guide(), make_rough_guide(exact_outer=data)):
        stats = {k: _mean_and_se(IWAE(num_particles=k), guide, data, 200) for k in (1, 10, 100)}
        for k, (m, se) in stats.items():
            assert m < logp + 3 * se, f"K={k} estimate above the exact log evidence"
    # with exact outer draws the whole gap is the locals' gap, which is strictly decreasing in
    # K and shrinks like 1/K asymptotically (Domke & Sheldon, 2018): 1/K predicts 10x from
    # K=10 to K=100; require at least 3x (pre-asymptotic slack) beyond Monte Carlo error
    (m1, s1), (m10, s10), (m100, s100) = stats[1], stats[10], stats[100]
    assert m10 - m1 > 3 * math.hypot(s1, s10)
    assert m100 - m10 > 3 * math.hypot(s10, s100)
    gap10, gap100 = logp - m10, logp - m100
    assert gap100 < gap10 / 3 + 3 * s100


def test_k1_matches_trace_elbo_in_expectation():
    data = make_data()
    guide = make_rough_guide()
    pyro.set_rng_seed(3)
    iwae = IWAE(num_particles=1, num_outer_particles=4000).log_weights(model, guide, data)
    per_draw = iwae.scale * iwae.inner.sum(-1) + iwae.global_terms
    elbo = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(4)
    loss = elbo.loss(model, guide, data)
    se = float(per_draw.std()) / math.sqrt(4000)
    # two independent means of the same estimator: difference within 4 combined SEs
    assert abs(-loss - float(per_draw.mean())) < 4 * math.sqrt(2) * se


def test_gradient_matches_finite_differences():
    data = make_data()

    def loss_of(theta):
        pyro.set_rng_seed(11)
        return IWAE(num_particles=5, num_outer_particles=2).differentiable_loss(
            model, make_rough_guide(theta), data
        )

    theta = torch.tensor([0.3, -0.5, 0.2, 0.8, -0.6], requires_grad=True)
    assert torch.autograd.gradcheck(loss_of, (theta,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_dreg_gradient_is_unbiased_for_the_iwae_gradient():
    # DReG changes the estimator, not its expectation, for the local guide parameters
    data = make_data()
    theta0 = torch.tensor([0.3, -0.5, 0.2, 0.8, -0.6])

    def grads(dreg: bool, reps: int) -> torch.Tensor:
        out = []
        for _ in range(reps):
            theta = theta0.clone().requires_grad_(True)
            loss = IWAE(num_particles=8, dreg=dreg).differentiable_loss(
                model, make_rough_guide(theta), data
            )
            (g,) = torch.autograd.grad(loss, theta)
            out.append(g)
        return torch.stack(out)

    pyro.set_rng_seed(5)
    g_std = grads(False, 400)
    pyro.set_rng_seed(6)
    g_dreg = grads(True, 400)
    se = torch.sqrt(g_std.var(0) / 400 + g_dreg.var(0) / 400)
    diff = (g_std.mean(0) - g_dreg.mean(0)).abs()
    # local guide parameters are theta[3:] (z loc shrink, z log-scale)
    assert torch.all(diff[3:] < 4 * se[3:]), (diff, se)
    # on the same draws, DReG changes only the local guide parameters' gradient: the global
    # guide parameters (theta[:3]) keep the IWAE gradient exactly, the local ones do not
    pyro.set_rng_seed(8)
    same_std = grads(False, 1)[0]
    pyro.set_rng_seed(8)
    same_dreg = grads(True, 1)[0]
    torch.testing.assert_close(same_dreg[:3], same_std[:3], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(same_dreg[3:], same_std[3:], rtol=1e-6, atol=1e-9)


def test_failed_particles_get_zero_weight_and_dead_individuals_are_named():
    data = make_data()

    def model_with_status(data, fail_all=False):
        mu = pyro.sample("mu", dist.Normal(0.0, TAU))
        with pyro.plate("groups", G, dim=-1):
            g = pyro.sample("g", dist.Normal(mu, SG))
        with pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1):
            z = pyro.sample("z", dist.Normal(g[..., data.groups], SZ))
            # a stand-in ODE site whose status fails for individual 2 (every particle if
            # fail_all, else particles with z < 0)
            status = torch.zeros(z.shape, dtype=torch.long)
            if fail_all:
                status[..., 2] = 1
            else:
                status = torch.where(z < 0, 1, 0) * (torch.arange(z.shape[-1]) == 2)
            x = torch.where(status.bool(), torch.nan, z)
            pyro.sample(
                "x",
                dist.Delta(x, event_dim=0).mask(False),
                obs=x,
                infer={"_deterministic": True, "ode_status": status},
            )
            pyro.sample(
                "y",
                dist.Normal(torch.nan_to_num(x).unsqueeze(-1), SY).to_event(1),
                obs=data.y,
            )

    guide = make_rough_guide()
    w = IWAE(num_particles=50).log_weights(model_with_status, guide, data)
    z = w.guide_trace.nodes["z"]["value"]
    failed = (z[..., 2] < 0).expand(1, 50)
    assert torch.all(torch.isneginf(w.local[..., 2][failed]))
    assert torch.all(torch.isfinite(w.local[..., 2][~failed]))
    assert torch.all(torch.isfinite(w.local[..., [0, 1, 3]]))
    with pytest.raises(NonFiniteLossError, match="well2"):
        IWAE(num_particles=5).differentiable_loss(
            lambda d: model_with_status(d, fail_all=True), guide, data
        )


def test_nonfinite_log_density_is_an_error_naming_the_site():
    data = make_data()
    bad_y = data.y.clone()
    bad_y[4, 1] = math.nan
    data.y = bad_y

    def guide(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", G, dim=-1):
            pyro.sample("g", dist.Normal(mu, 1.0))
        with pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1):
            pyro.sample("z", dist.Normal(torch.zeros(len(data.indices)), 1.0))

    pyro.enable_validation(False)  # let the NaN reach the objective, as a model bug would
    with pytest.raises(NonFiniteLossError, match=r"model site 'y', individuals well4"):
        IWAE(num_particles=3).differentiable_loss(model, guide, data)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="num_particles"):
        IWAE(num_particles=0)
    with pytest.raises(ValueError, match="num_outer_particles"):
        IWAE(num_outer_particles=1.5)  # type: ignore[arg-type]


def test_trains_with_svi():
    data = make_data()
    pyro.clear_param_store()

    def guide(data):
        m = pyro.param("m", torch.tensor(0.0))
        s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
        mu = pyro.sample("mu", dist.Normal(m, s))
        with pyro.plate("groups", G, dim=-1):
            gl = pyro.param("gl", torch.zeros(G))
            g = pyro.sample("g", dist.Normal(mu + gl, 0.5))
        with pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1):
            a = pyro.param("a", torch.tensor(0.5))
            pyro.sample("z", dist.Normal(a * data.y.mean(-1) + (1 - a) * g[..., data.groups], 0.3))

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=IWAE(num_particles=8))
    first = sum(svi.step(data) for _ in range(20)) / 20
    for _ in range(200):
        svi.step(data)
    last = sum(svi.step(data) for _ in range(20)) / 20
    assert last < first
    assert -last <= exact_log_evidence(data) + 1.0


def _mixed_model(data):
    """Global sites of every kind the grouped evaluation takes (normal, log-normal, an
    expanded log-normal vector, a log-normal in the groups plate) and one it does not
    (gamma), over the conjugate model's locals."""
    mu = pyro.sample("mu", dist.Normal(0.0, TAU))
    rate = pyro.sample("rate", dist.LogNormal(0.5, 0.7))
    vec = pyro.sample("vec", dist.LogNormal(0.0, 1.0).expand([3]).to_event(1))
    shape = pyro.sample("shape", dist.Gamma(2.0, 1.0))
    with pyro.plate("groups", G, dim=-1):
        g = pyro.sample("g", dist.Normal(mu, SG))
        spread = pyro.sample("spread", dist.LogNormal(-1.0, 0.5))
    with pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1):
        gi = g[..., data.groups] + 0.01 * (rate + vec.sum(-1, keepdim=True).squeeze(-1) + shape)
        z = pyro.sample("z", dist.Normal(gi, SZ + spread[..., data.groups]))
        pyro.sample("y", dist.Normal(z.unsqueeze(-1), SY).to_event(1), obs=data.y)


def _mixed_guide(data):
    from pyro_hds.guides import _ExpNormal

    p = pyro.param("p", torch.linspace(-0.5, 0.5, 12, dtype=torch.float64))
    pyro.sample("mu", dist.Normal(p[0], p[1].exp()))
    pyro.sample("rate", _ExpNormal(p[2], p[3].exp()))
    pyro.sample("vec", dist.LogNormal(p[4:7], p[7].exp()).to_event(1))
    pyro.sample("shape", dist.Gamma(p[8].exp() + 1.0, 1.0))
    with pyro.plate("groups", G, dim=-1):
        pyro.sample("g", dist.Normal(p[9] + torch.zeros(G, dtype=torch.float64), 0.5))
        pyro.sample("spread", _ExpNormal(p[10] - 1.0, p[11].exp()))
    with pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1):
        pyro.sample("z", dist.Normal(data.y.mean(-1), 0.3))


def test_grouped_global_densities_equal_site_by_site(monkeypatch):
    """Without validation the normal and log-normal global sites of each trace are evaluated
    in one pass (``_grouped_log_densities``); every term, the bound and its gradient equal
    those of ``fn.log_prob`` site by site (float64: round-off only)."""
    import pyro_hds.objectives as objectives

    data = make_data()
    data.y = data.y.double()
    grouped_names: list[list[str]] = []
    original = objectives._grouped_log_densities

    def spy(members, s, log_space):
        grouped_names.append([m[0] for m in members])
        return original(members, s, log_space)

    monkeypatch.setattr(objectives, "_grouped_log_densities", spy)
    out = {}
    for validate in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        with pyro.validation_enabled(validate):
            w = IWAE(num_particles=4, num_outer_particles=3).log_weights(
                _mixed_model, _mixed_guide, data
            )
        (grad,) = torch.autograd.grad(w.bound, [pyro.param("p").unconstrained()])
        out[validate] = (w, grad)
    # the site-by-site pass (validation on) groups nothing; the other groups all but gamma,
    # the normal sites and the log-normal ones of each trace apart
    assert grouped_names == [["mu", "g"], ["rate", "vec", "spread"]] * 2
    (w1, g1), (w0, g0) = out[True], out[False]
    torch.testing.assert_close(w0.local, w1.local, rtol=0, atol=0)
    torch.testing.assert_close(w0.global_terms, w1.global_terms, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(g0, g1, rtol=1e-12, atol=1e-12)
    assert [(k, n) for k, n, _ in w0.contributions] == [(k, n) for k, n, _ in w1.contributions]
    for (_, name, t0), (_, _, t1) in zip(w0.contributions, w1.contributions):
        torch.testing.assert_close(t0, t1, rtol=1e-13, atol=1e-12, msg=name)
    assert w0.outer_elements.keys() == w1.outer_elements.keys()
    for name, e in w1.outer_elements.items():
        torch.testing.assert_close(w0.outer_elements[name], e, rtol=1e-13, atol=1e-12)
