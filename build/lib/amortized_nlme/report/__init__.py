"""The results folder of a population fit: tables, the human-readable report and the figures.

Public API: :func:`write_results` (everything, atomically) and its optional inputs (:class:`ResidualError`,
:class:`Censoring`, :class:`DerivedParameter`, :class:`VPCOptions`); :func:`format_estimates` (the printed table);
:func:`compute_diagnostics` (PRED, IPRED, IWRES, NPDE); :func:`visual_predictive_check` and
:func:`sample_population` (simulating the fitted population); :func:`simulate_observations` (the one way the report
adds residual error); and the file names.
"""

from amortized_nlme.report.censoring import Censoring
from amortized_nlme.report.constants import (
    CORRELATION_FILE,
    COVARIANCE_FILE,
    DERIVED_FILE,
    ESTIMATES_FILE,
    INDIVIDUAL_FILE,
    INDIVIDUAL_FITS_PDF,
    PATAB_FILE,
    PYPESTO_FILE,
    RANDOM_EFFECTS_FILE,
    REPORT_FILE,
    SDTAB_FILE,
    SUMMARY_FILE,
)
from amortized_nlme.report.diagnostics import Diagnostics, compute_diagnostics, npde
from amortized_nlme.report.parameters import (
    DerivedParameter,
    covariance_of_estimates,
    delta_method,
    derived_frame,
    estimates_frame,
    random_effects_frame,
)
from amortized_nlme.report.residuals import (
    ResidualError,
    individual_predictions,
    individual_residual_error,
    simulate_observations,
)
from amortized_nlme.report.tables import format_estimates
from amortized_nlme.report.vpc import (
    VPCOptions,
    VPCPanel,
    sample_population,
    simulate_vpc,
    time_bins,
    visual_predictive_check,
    vpc_panels,
)
from amortized_nlme.report.writer import write_results

__all__ = ["CORRELATION_FILE", "COVARIANCE_FILE", "Censoring", "DERIVED_FILE", "DerivedParameter", "Diagnostics",
           "ESTIMATES_FILE", "INDIVIDUAL_FILE", "INDIVIDUAL_FITS_PDF", "PATAB_FILE", "PYPESTO_FILE",
           "RANDOM_EFFECTS_FILE", "REPORT_FILE", "ResidualError", "SDTAB_FILE", "SUMMARY_FILE", "VPCOptions",
           "VPCPanel", "compute_diagnostics", "covariance_of_estimates", "delta_method", "derived_frame",
           "estimates_frame", "format_estimates", "individual_predictions", "individual_residual_error", "npde",
           "random_effects_frame", "sample_population", "simulate_observations", "simulate_vpc", "time_bins",
           "visual_predictive_check", "vpc_panels", "write_results"]
