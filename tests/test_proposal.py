"""Refined importance proposals: the Student-t mixtures' densities are exact and refinement never forgets a mode."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp
from scipy.stats import multivariate_t

from amortized_nlme.inference.proposal import MODE, MODE_SHARE, POPULATION, ProposalSet, TMixture


def _mixture(rng: np.random.Generator, c: int, k: int, kind: int) -> TMixture:
    loc = rng.normal(size=(c, k))
    a = rng.normal(size=(c, k, k)) * 0.3 + np.eye(k)
    chol = np.linalg.cholesky(a @ np.transpose(a, (0, 2, 1)) + 0.1 * np.eye(k))
    return TMixture(loc, chol, rng.normal(size=c), kinds=np.full(c, kind, dtype=np.int8))


def test_mixture_density_is_scipys_multivariate_t() -> None:
    rng = np.random.default_rng(0)
    mix = _mixture(rng, 3, 2, MODE)
    m_q, counts = mix.counts(1000)
    assert m_q + counts.sum() == 1000
    x = mix.sample(counts, rng)
    assert x.shape == (counts.sum(), 2)
    expected = logsumexp(
        [np.log(counts[c] / counts.sum()) + multivariate_t(mix.loc[c], mix.chol[c] @ mix.chol[c].T, df=mix.df).logpdf(x)
         for c in range(3)], axis=0)
    np.testing.assert_allclose(mix.log_prob(x, counts), expected, rtol=1e-10, atol=1e-10)


def test_refinement_keeps_every_mode_and_the_latest_population_components() -> None:
    rng = np.random.default_rng(1)
    from simulators import get_model

    # only the mixtures are used here; a model without a mirror symmetry
    proposals = ProposalSet(None, get_model("pk_1cmt_iv"), None, np.zeros((1, 1)), None, "", None)
    mode_locs = []
    for round_ in range(5):
        new = _mixture(rng, 1, 2, POPULATION)
        if round_ in (0, 3):  # the individual is flagged in rounds 0 and 3: a mode each time
            modes = _mixture(rng, 2, 2, MODE)
            mode_locs.append(modes.loc)
            new = new.joined(modes)
        proposals.add_mixtures({0: new})
    mix = proposals.mixtures[0]
    # both rounds' modes are still there (dropping round 0's modes collapsed the demo's effective sample size)
    for loc in mode_locs:
        for row in loc:
            assert np.any(np.all(mix.loc == row, axis=1))
    assert np.sum(mix.kinds == POPULATION) == 2  # population components of the last two rounds only
    share = np.exp(mix.log_pi - logsumexp(mix.log_pi))
    assert np.isclose(share[mix.kinds == MODE].sum(), MODE_SHARE)
    assert np.isclose(share.sum(), 1.0)
    # each round's modes get an equal part of the modes' share
    for r in np.unique(mix.rounds[mix.kinds == MODE]):
        assert np.isclose(share[(mix.kinds == MODE) & (mix.rounds == r)].sum(), MODE_SHARE / 2)
