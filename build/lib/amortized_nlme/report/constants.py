"""File names of the results folder and how much the figures subsample (shared by the report modules).

Tables (``sdtab.csv``, ``patab.csv``, ``estimates.csv``, ...) always cover every individual and observation; only
figures subsample, by the limits below, and say so in their titles and in report.md.
"""

ESTIMATES_FILE = "estimates.csv"
RANDOM_EFFECTS_FILE = "random_effects.csv"
DERIVED_FILE = "derived_parameters.csv"
COVARIANCE_FILE = "covariance.csv"
CORRELATION_FILE = "correlation.csv"
SUMMARY_FILE = "summary.json"
INDIVIDUAL_FILE = "individual_estimates.csv"
SDTAB_FILE = "sdtab.csv"
PATAB_FILE = "patab.csv"
PYPESTO_FILE = "pypesto_result.h5"
REPORT_FILE = "report.md"
INDIVIDUAL_FITS_PDF = "individual_fits.pdf"

#: VPC: at most this many individuals (chosen at random), each simulated N_VPC_REPLICATES times
MAX_VPC_INDIVIDUALS = 1000
N_VPC_REPLICATES = 200
#: individual-fit figures: panels in individual_fits.png (worst, best, random), draws per IPRED band
N_WORST_FITS = 3
N_BEST_FITS = 3
N_RANDOM_FITS = 6
N_INDIVIDUAL_FITS = N_WORST_FITS + N_BEST_FITS + N_RANDOM_FITS
N_FIT_DRAWS = 100
#: individual_fits.pdf holds every individual up to this many; above, the worst half and a random half of this many
MAX_PDF_INDIVIDUALS = 320
PDF_ROWS, PDF_COLS = 4, 4
#: goodness-of-fit scatter plots draw at most this many observations (trend lines use all of them)
MAX_GOF_POINTS = 20_000
#: individuals used for the fitted population density in parameter_distributions.png
MAX_DENSITY_INDIVIDUALS = 2000
#: VPC binning: one bin per distinct design time when there are at most this many and each has enough points,
#: else optimal 1-D k-means (Jenks) bins of the observed times
MAX_DISTINCT_TIMES = 200
MIN_POINTS_PER_TIME = 5
N_TIME_BINS = 10
MIN_POINTS_PER_BIN = 10
#: NPDE: simulations per individual K between MIN (raised to 2 x an individual's observations + 20) and MAX, as many
#: as NPDE_SIMULATION_BUDGET simulated values allow; NPDE_BLOCK_VALUES simulated values in memory at a time
MAX_NPDE_SIMULATIONS = 1000
MIN_NPDE_SIMULATIONS = 200
NPDE_SIMULATION_BUDGET = 50_000_000
NPDE_BLOCK_VALUES = 4_000_000
