"""Stage 3's statistics, independent of how the posterior draws were made: population models on the log-parameter
scale, the Monte-Carlo population objective with its analytic gradient, multistart fits with Wald and profile
intervals and their Monte-Carlo error (pyPESTO), absolute likelihoods and information criteria by importance
sampling, and covariate selection.

Public API: :class:`PopulationModel`, :func:`bind_population`, :class:`DrawSet`, :class:`PopulationObjective`,
:func:`fit`, :func:`fit_with_enough_draws`, :func:`profile_intervals`, :class:`ImportanceSampler`,
:func:`select_covariates`.
"""

from amortized_nlme.population.covariates import bind_population, covariate_columns, dummy_columns
from amortized_nlme.population.fit import FitResult, fit, fit_with_enough_draws, monte_carlo_error, profile_intervals
from amortized_nlme.population.marginal import ImportanceSampler, count_observations, information_criteria
from amortized_nlme.population.model import PopulationModel
from amortized_nlme.population.objective import DrawSet, PopulationObjective
from amortized_nlme.population.selection import select_covariates, write_selection

__all__ = ["DrawSet", "FitResult", "ImportanceSampler", "PopulationModel", "PopulationObjective", "bind_population",
           "count_observations", "covariate_columns", "dummy_columns", "fit", "fit_with_enough_draws", "monte_carlo_error",
           "information_criteria", "profile_intervals", "select_covariates", "write_selection"]
