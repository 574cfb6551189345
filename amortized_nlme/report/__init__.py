"""The results folder of a population fit: tables, the human-readable report and the figures.

Public API: :func:`write_results` (everything, atomically), :func:`format_estimates` (the printed table),
:func:`visual_predictive_check` and :func:`sample_population` (simulating the fitted population), and the file names.
"""

from amortized_nlme.report.constants import (
    ESTIMATES_FILE, INDIVIDUAL_FILE, PYPESTO_FILE, REPORT_FILE, SUMMARY_FILE)
from amortized_nlme.report.tables import estimates_frame, format_estimates
from amortized_nlme.report.vpc import sample_population, time_bins, visual_predictive_check
from amortized_nlme.report.writer import write_results

__all__ = ["ESTIMATES_FILE", "INDIVIDUAL_FILE", "PYPESTO_FILE", "REPORT_FILE", "SUMMARY_FILE", "estimates_frame",
           "format_estimates", "sample_population", "time_bins", "visual_predictive_check", "write_results"]
