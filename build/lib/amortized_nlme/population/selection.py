"""Automated covariate selection by BICc, every candidate model fitted on the same posterior draws.

Candidates are covariate-parameter relations (parameter p, candidate covariate c); a categorical covariate given as
dummy columns ``c_<level>`` enters or leaves as a whole. The search is exhaustive over all subsets of relations when
there are at most ``max_exhaustive`` models (2^9 = 512 by default), otherwise stepwise (forward inclusion, then backward
elimination, as in SCM, with BICc instead of likelihood-ratio tests).

Ranking uses the amortized objective: BICc_rel = 2 J(theta_hat) + penalty, where J = -log p(D | theta) + C with one
constant C shared by every population model fitted to the same draws, so differences of BICc_rel are differences of
BICc. The chosen model, the next best, the base model and every model within the objective's Monte-Carlo error of the
best then get an absolute log-likelihood by importance sampling (:mod:`amortized_nlme.population.marginal`), which makes their
-2LL/AIC/BIC/BICc comparable with other tools; the final choice among them is by that BICc.
Each fit uses few starts: the posterior-median guess, the estimate of the best already fitted nested model (one
relation fewer) mapped into the new layout, and seeded random starts.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amortized_nlme.population.fit import fit
from amortized_nlme.population.marginal import ImportanceSampler, MarginalLikelihood, penalty_bicc
from amortized_nlme.population.model import PopulationModel
from amortized_nlme.population.objective import DrawSet
from amortized_nlme.provenance import to_json

logger = logging.getLogger(__name__)

Relation = tuple[str, str]  # (individual parameter, candidate covariate)

#: exhaustive search up to this many models (2^9)
MAX_EXHAUSTIVE = 512


@dataclass
class VisitedModel:
    """One fitted candidate: its relations, the optimum of J and the criteria on the amortized scale."""

    relations: tuple[Relation, ...]
    model: PopulationModel
    estimate: np.ndarray
    objective: float
    objective_mc_se: float
    bicc_rel: float
    aic_rel: float
    bic_rel: float
    n_theta: int
    n_converged: int
    n_starts: int
    time_s: float
    order: int
    marginal: MarginalLikelihood | None = None

    @property
    def label(self) -> str:
        return relations_label(self.relations)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        d: dict[str, Any] = {
            "label": self.label,
            "relations": [list(r) for r in self.relations],
            "objective": self.objective,
            "objective_mc_se": self.objective_mc_se,
            "bicc_rel": self.bicc_rel,
            "aic_rel": self.aic_rel,
            "bic_rel": self.bic_rel,
            "n_theta": self.n_theta,
            "n_converged": self.n_converged,
            "n_starts": self.n_starts,
            "time_s": self.time_s,
            "order": self.order,
            "estimate": dict(zip(self.model.parameter_names, map(float, self.estimate))),
        }
        if self.marginal is not None:
            d["marginal"] = self.marginal.summary()
        return d


@dataclass
class SelectionResult:
    """Outcome of :func:`select_covariates`: every model visited, the selection and its absolute criteria."""

    strategy: str
    candidates: dict[str, tuple[str, ...]]
    parameters: tuple[str, ...]
    relations: tuple[Relation, ...]
    visited: list[VisitedModel]
    selected: VisitedModel
    base: VisitedModel
    n_fits: int
    time_s: float
    n_individuals: int
    n_observations: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    marginal_time_s: float = 0.0
    #: the best model by the objective-based BICc, when the importance-sampling BICc chose another one
    selected_by_objective: VisitedModel | None = None

    def ranked(self) -> list[VisitedModel]:
        """Visited models, best BICc first."""
        return sorted(self.visited, key=lambda v: v.bicc_rel)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "candidates": {k: list(v) for k, v in self.candidates.items()},
            "parameters": list(self.parameters),
            "selected": self.selected.label,
            "selected_relations": [list(r) for r in self.selected.relations],
            "selected_by_objective": (self.selected_by_objective.label if self.selected_by_objective is not None
                                      else self.selected.label),
            "n_fits": self.n_fits,
            "time_s": self.time_s,
            "marginal_time_s": self.marginal_time_s,
            "n_individuals": self.n_individuals,
            "n_observations": self.n_observations,
            "steps": self.steps,
            "visited": [v.to_dict() for v in self.ranked()],
            "bicc_note": "bicc_rel = 2 J + P_R log N + P_F log N_tot; J = -log p(D | theta) + C with C shared by all "
                         "models, so only differences are meaningful; 'marginal' holds absolute values",
        }

    def markdown(self, top: int = 10) -> str:
        """Table of the best ``top`` models and of every model with absolute (importance-sampling) numbers."""
        best = self.ranked()[0].bicc_rel
        lines = ["| rank | relations | #theta | ΔBICc (objective) | -2LL (IS) | BICc (IS) |",
                 "|---:|---|---:|---:|---:|---:|"]
        for r, v in enumerate(self.ranked(), 1):
            if r > top and v.marginal is None:
                continue
            m2ll = bicc = ""
            if v.marginal is not None:
                m2ll = f"{v.marginal.minus2ll:.2f} ± {v.marginal.minus2ll_se:.2f}"
                bicc = f"{v.marginal.criteria['bicc']:.2f}"
            lines.append(f"| {r} | {v.label} | {v.n_theta} | {v.bicc_rel - best:.2f} | {m2ll} | {bicc} |")
        return "\n".join(lines)


def relations_label(relations: Sequence[Relation]) -> str:
    """Readable name of a covariate model, e.g. ``V~wt + ka~wt`` (``base`` when empty)."""
    return " + ".join(f"{p}~{c}" for p, c in relations) if relations else "base"


def covariate_columns(candidates: Sequence[str], available: Mapping[str, np.ndarray]) -> dict[str, tuple[str, ...]]:
    """Columns of each candidate covariate: the column of that name, else its dummy columns ``<name>_<level>``."""
    out: dict[str, tuple[str, ...]] = {}
    for c in candidates:
        if c in available:
            out[c] = (c,)
            continue
        dummies = tuple(sorted(k for k in available if k.startswith(f"{c}_")))
        if not dummies:
            raise ValueError(f"candidate covariate {c!r} not found; available columns: {sorted(available)}")
        out[c] = dummies
    return out


def build_model(base: PopulationModel, relations: Sequence[Relation], columns: Mapping[str, Sequence[str]]
                ) -> PopulationModel:
    """``base`` plus the covariate columns of ``relations`` (the base model's own covariates are kept)."""
    covs = {p: list(c) for p, c in base.covariates.items()}
    for p, c in relations:
        lst = covs.setdefault(p, [])
        lst += [col for col in columns[c] if col not in lst]
    return base.replace(covariates=covs)


def transfer_estimate(src: PopulationModel, theta: np.ndarray, dst: PopulationModel) -> np.ndarray:
    """Map an estimate into another layout by parameter name: shared entries copied, new covariate effects 0,
    anything else from the middle of ``dst``'s bounds; clipped strictly inside the bounds."""
    values = dict(zip(src.parameter_names, np.asarray(theta, dtype=np.float64)))
    lb, ub = dst.bounds()
    out = np.empty(dst.n_theta)
    for i, name in enumerate(dst.parameter_names):
        if name in values:
            out[i] = values[name]
        elif name.startswith("B_"):
            out[i] = 0.0
        else:
            out[i] = 0.5 * (lb[i] + ub[i])
    return np.clip(out, lb + 1e-6 * (ub - lb), ub - 1e-6 * (ub - lb))


class _Search:
    """Fits candidate models on one draw set and remembers them (a model is never fitted twice)."""

    def __init__(self, base: PopulationModel, draws: DrawSet, covariates: Mapping[str, np.ndarray],
                 groups: Any, columns: Mapping[str, tuple[str, ...]], n_observations: int, n_starts: int,
                 seed: int, optimizer_options: Mapping[str, Any] | None) -> None:
        self.base, self.draws, self.covariates, self.groups = base, draws, covariates, groups
        self.columns, self.n_obs = columns, n_observations
        self.n_starts, self.seed, self.optimizer_options = n_starts, seed, optimizer_options
        self.fitted: dict[frozenset[Relation], VisitedModel] = {}

    def get(self, relations: Sequence[Relation]) -> VisitedModel:
        key = frozenset(relations)
        if key in self.fitted:
            return self.fitted[key]
        rel = tuple(sorted(key))
        model = build_model(self.base, rel, self.columns)
        parents = [self.fitted[key - {r}] for r in key if key - {r} in self.fitted]
        guesses = []
        if parents:
            best = min(parents, key=lambda v: v.objective)
            guesses.append(transfer_estimate(best.model, best.estimate, model))
        t0 = time.perf_counter()
        fr = fit(model, self.draws, self.covariates, self.groups, n_starts=max(self.n_starts, len(guesses) + 1),
                 seed=self.seed + len(self.fitted), x_guesses=guesses, optimizer_options=self.optimizer_options,
                 wald=False)
        n, p = self.draws.n, fr.estimate.size
        pen = penalty_bicc(model, n, self.n_obs)
        v = VisitedModel(
            relations=rel, model=model, estimate=fr.estimate, objective=fr.fval, objective_mc_se=fr.mc_se_fval,
            bicc_rel=2.0 * fr.fval + pen, aic_rel=2.0 * fr.fval + 2.0 * p, bic_rel=2.0 * fr.fval + p * math.log(n),
            n_theta=p, n_converged=fr.n_converged, n_starts=fr.n_starts, time_s=time.perf_counter() - t0,
            order=len(self.fitted),
        )
        self.fitted[key] = v
        logger.info("model %d: %-40s J %.3f  BICc_rel %.3f  (%d/%d starts converged, %.1f s)", v.order, v.label,
                    v.objective, v.bicc_rel, v.n_converged, v.n_starts, v.time_s)
        return v


def select_covariates(
    base: PopulationModel,
    draws: DrawSet,
    covariates: Mapping[str, np.ndarray],
    candidates: Sequence[str],
    n_observations: int,
    parameters: Sequence[str] | None = None,
    groups: np.ndarray | Sequence[Any] | None = None,
    strategy: str = "auto",
    max_exhaustive: int = MAX_EXHAUSTIVE,
    n_starts: int = 3,
    seed: int = 0,
    sampler: ImportanceSampler | None = None,
    top_k: int = 3,
    optimizer_options: Mapping[str, Any] | None = None,
) -> SelectionResult:
    """Find the covariate-parameter relations minimising BICc (amortized objective, same draws for every fit); with a
    ``sampler``, add importance-sampling -2LL/AIC/BIC/BICc for the selected model, the next ``top_k - 1``, the base and
    every model within the objective's Monte-Carlo error of the best (:func:`marginal_candidates`), and choose among
    them by that BICc.

    ``parameters``: which individual parameters may get covariates (default: those with a random effect);
    ``n_observations``: N_tot for BICc (see :func:`amortized_nlme.population.marginal.count_observations`).
    """
    t0 = time.perf_counter()
    columns = covariate_columns(candidates, covariates)
    params = tuple(parameters) if parameters else tuple(base.random_effects)
    bad = [p for p in params if p not in base.param_names_individual]
    if bad:
        raise ValueError(f"unknown parameters {bad}; parameters are {list(base.param_names_individual)}")
    relations = tuple((p, c) for p in params for c in columns
                      if not set(columns[c]) <= set(base.covariates.get(p, ())))
    n_models = 2 ** len(relations)
    if strategy == "auto":
        strategy = "exhaustive" if n_models <= max_exhaustive else "stepwise"
    if strategy not in ("exhaustive", "stepwise"):
        raise ValueError(f"strategy must be 'auto', 'exhaustive' or 'stepwise', got {strategy!r}")
    logger.info("covariate selection (%s): %d candidate relations, %d possible models, %d individuals x %d draws",
                strategy, len(relations), n_models, draws.n, draws.M)
    search = _Search(base, draws, covariates, groups, columns, n_observations, n_starts, seed, optimizer_options)
    steps: list[dict[str, Any]] = []
    base_fit = search.get(())
    if strategy == "exhaustive":
        for size in range(1, len(relations) + 1):
            for subset in itertools.combinations(relations, size):
                search.get(subset)
        selected = min(search.fitted.values(), key=lambda v: v.bicc_rel)
    else:
        selected = _stepwise(search, relations, steps)
    visited = sorted(search.fitted.values(), key=lambda v: v.order)
    result = SelectionResult(
        strategy=strategy, candidates=columns, parameters=params, relations=relations, visited=visited,
        selected=selected, base=base_fit, n_fits=len(visited), time_s=time.perf_counter() - t0,
        n_individuals=draws.n, n_observations=n_observations, steps=steps,
    )
    logger.info("selected %s (BICc_rel %.3f) after %d fits in %.1f s", selected.label, selected.bicc_rel,
                result.n_fits, result.time_s)
    if sampler is not None:
        add_marginal(result, sampler, covariates, groups, top_k)
    return result


def _stepwise(search: _Search, relations: Sequence[Relation], steps: list[dict[str, Any]]) -> VisitedModel:
    """Forward inclusion while BICc decreases, then backward elimination while it decreases."""
    current = search.get(())
    while True:  # forward
        trial = [search.get(current.relations + (r,)) for r in relations if r not in current.relations]
        if not trial:
            break
        best = min(trial, key=lambda v: v.bicc_rel)
        steps.append({"direction": "forward", "from": current.label, "best": best.label,
                      "delta_bicc": best.bicc_rel - current.bicc_rel, "tried": [v.label for v in trial]})
        if best.bicc_rel >= current.bicc_rel:
            break
        current = best
    while current.relations:  # backward
        trial = [search.get(tuple(r for r in current.relations if r != drop)) for drop in current.relations]
        best = min(trial, key=lambda v: v.bicc_rel)
        steps.append({"direction": "backward", "from": current.label, "best": best.label,
                      "delta_bicc": best.bicc_rel - current.bicc_rel, "tried": [v.label for v in trial]})
        if best.bicc_rel >= current.bicc_rel:
            break
        current = best
    return current


#: models within this many Monte-Carlo standard errors (of the objective BICc difference) of the best one are
#: re-evaluated by importance sampling even outside the top k: the fitting draws cannot tell them apart
TIE_SE = 3.0
#: ... and within this absolute BICc margin (a BICc difference below 2 is no evidence either way)
TIE_BICC = 2.0


def marginal_candidates(result: SelectionResult, top_k: int = 3, max_models: int = 12) -> list[VisitedModel]:
    """The models that get importance-sampling criteria: the selected one, the next ``top_k - 1``, the base, and
    every model the objective cannot separate from the best (BICc gap below ``TIE_BICC`` + ``TIE_SE`` Monte-Carlo
    SEs of 2 J's difference), best first, at most ``max_models`` in all."""
    ranked = result.ranked()
    best = ranked[0]
    chosen: list[VisitedModel] = []
    for v in [result.selected, *ranked[:top_k], result.base]:
        if all(v is not c for c in chosen):
            chosen.append(v)
    for v in ranked:
        if len(chosen) >= max_models:
            break
        margin = TIE_BICC + TIE_SE * 2.0 * math.hypot(best.objective_mc_se, v.objective_mc_se)
        if v.bicc_rel - best.bicc_rel <= margin and all(v is not c for c in chosen):
            chosen.append(v)
    return chosen


def add_marginal(result: SelectionResult, sampler: ImportanceSampler, covariates: Mapping[str, np.ndarray],
                 groups: Any = None, top_k: int = 3, max_models: int = 12) -> None:
    """Importance-sampling log-likelihood and absolute criteria for the models of :func:`marginal_candidates`, and
    the final choice among them by that BICc: its proposal adapts to each theta, so it does not share the fitting
    draws' Monte-Carlo noise that a search over many models on one draw set can overfit."""
    t0 = time.perf_counter()
    chosen = marginal_candidates(result, top_k, max_models)
    logger.info("importance-sampling criteria for %d models (%s)", len(chosen), ", ".join(v.label for v in chosen))
    for v in chosen:
        v.marginal = sampler.evaluate(v.model, v.estimate, covariates, groups)
    result.marginal_time_s = time.perf_counter() - t0
    best_is = min(chosen, key=lambda v: v.marginal.criteria["bicc"])
    if best_is is not result.selected:
        gap = result.selected.marginal.criteria["bicc"] - best_is.marginal.criteria["bicc"]
        se = math.hypot(result.selected.marginal.minus2ll_se, best_is.marginal.minus2ll_se)
        logger.warning("importance-sampling BICc prefers %s over %s (best by the objective) by %.2f (MC SE of the "
                       "difference about %.2f); selecting %s", best_is.label, result.selected.label, gap, se,
                       best_is.label)
        result.selected_by_objective = result.selected
        result.selected = best_is


# ------------------------------------------------------------------------------------------------------ output


def plot_selection(result: SelectionResult, path: str | Path) -> Path:
    """Search plot: ΔBICc of every visited model in fitting order (selected model and step-wise path highlighted),
    and the best models ranked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    best = min(v.bicc_rel for v in result.visited)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    order = [v.order for v in result.visited]
    d = [v.bicc_rel - best for v in result.visited]
    sizes = [len(v.relations) for v in result.visited]
    sc = ax1.scatter(order, d, c=sizes, cmap="viridis", s=18)
    ax1.scatter([result.selected.order], [result.selected.bicc_rel - best], s=120, facecolors="none",
                edgecolors="red", label=f"selected: {result.selected.label}")
    ax1.set_xlabel("fit number")
    ax1.set_ylabel("ΔBICc (amortized objective)")
    ax1.set_yscale("symlog", linthresh=10.0)
    ax1.set_title(f"{result.strategy} search: {result.n_fits} fits, {result.time_s:.1f} s")
    fig.colorbar(sc, ax=ax1, label="number of relations")
    ax1.legend(loc="upper right", fontsize=8)
    ranked = result.ranked()[:12]
    y = np.arange(len(ranked))[::-1]
    ax2.barh(y, [v.bicc_rel - best for v in ranked],
             color=["red" if v is result.selected else "tab:blue" for v in ranked])
    ax2.scatter([v.bicc_rel - best for v in ranked], y, s=12,
                c=["red" if v is result.selected else "tab:blue" for v in ranked], zorder=3)
    ax2.set_yticks(y, [v.label for v in ranked], fontsize=7)
    ax2.set_xlabel("ΔBICc")
    ax2.set_title("best models")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_selection(result: SelectionResult, out_dir: str | Path) -> Path:
    """Write ``selection.json``, ``selection.md`` and ``selection.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.json").write_text(to_json(result.to_dict()))
    sel = result.selected
    lines = [f"# Covariate selection ({result.strategy})", "",
             f"Selected: **{sel.label}** — {result.n_fits} fits in {result.time_s:.1f} s "
             f"({result.n_individuals} individuals, {result.n_observations} observations).", ""]
    if sel.marginal is not None:
        c = sel.marginal.criteria
        lines += [f"Importance sampling: -2LL {c['minus2ll']:.2f} ± {sel.marginal.minus2ll_se:.2f} (MC SE), "
                  f"AIC {c['aic']:.2f}, BIC {c['bic']:.2f}, BICc {c['bicc']:.2f} "
                  f"({c['n_random']} parameters × log N, {c['n_fixed']} × log N_tot).", ""]
    lines += [result.markdown(), ""]
    (out / "selection.md").write_text("\n".join(lines))
    plot_selection(result, out / "selection.png")
    return out
