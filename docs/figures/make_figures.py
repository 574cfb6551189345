"""Regenerate the example figures of the README's "What a fit writes" section (docs/figures/*.png).

    python docs/figures/make_figures.py [--out results/theophylline-example]

Fits theophylline (12 subjects, amortized_nlme/example_data/theophylline_nonmem.csv) with the shipped
pk_oral_1cmt estimator and workflows/populations/theophylline.toml (ka, ke, V log-normal, diagonal Omega; weight and sex
defined as covariates but not in the model, so the ETA-covariate plot shows what a covariate model would add),
writes the whole results folder with two derived parameters (elimination half-life and clearance), and copies one
example of each figure here. About a minute on two cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIGURES = ("gof_dv_vs_pred.png", "gof_residuals.png", "npde.png", "eta_covariates.png", "eta_distributions.png",
           "pcvpc.png", "pcvpc_log.png", "individual_fits.png")


def main() -> None:
    from amortized_nlme.inference.pipeline import (
        InferenceOptions,
        fit_population,
        marginal_likelihood_summary,
        prepare_inference,
    )
    from amortized_nlme.report import DerivedParameter, write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "results" / "theophylline-example"))
    args = ap.parse_args()
    opts = InferenceOptions(model="pk_oral_1cmt", data="example:theophylline_nonmem.csv",
                            population=str(REPO / "workflows" / "populations" / "theophylline.toml"), out=args.out,
                            seed=0, n_starts=10, n_draws=4000, mc_refits=4, likelihood="exact", marginal="on")
    ctx = prepare_inference(opts)
    fr, mc = fit_population(ctx, True)
    selection = marginal_likelihood_summary(ctx, fr, opts)
    derived = [DerivedParameter("t_half", lambda p: np.log(2.0) / np.exp(p["ke"]), "elimination half-life", "h"),
               DerivedParameter("CL", lambda p: np.exp(p["ke"] + p["V"]), "clearance", "L/h")]
    out = write_results(Path(args.out), fit=fr, model=ctx.model, observations=ctx.observations, design=ctx.design,
                        draws=ctx.draws, ids=list(ctx.dataset.ids), covariates=ctx.covariates, groups=ctx.groups,
                        inputs={"data": opts.data, "population": opts.population, "seed": opts.seed},
                        extra={"monte_carlo": mc, "model_selection": selection}, seed=opts.seed, derived=derived)
    for name in FIGURES:
        shutil.copyfile(out / name, HERE / name)
    print(f"results in {out}; figures copied to {HERE}")


if __name__ == "__main__":
    main()
