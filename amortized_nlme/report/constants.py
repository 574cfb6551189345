"""File names of the results folder and how much the plots subsample (shared by the report modules)."""

ESTIMATES_FILE = "estimates.csv"
SUMMARY_FILE = "summary.json"
INDIVIDUAL_FILE = "individual_estimates.csv"
PYPESTO_FILE = "pypesto_result.h5"
REPORT_FILE = "report.md"

#: plot subsampling: the VPC uses at most this many individuals, each replicated N_VPC_REPLICATES times
MAX_VPC_INDIVIDUALS = 1000
N_VPC_REPLICATES = 50
#: individual-fit panels and posterior draws per panel
N_INDIVIDUAL_FITS = 12
N_FIT_DRAWS = 100
#: individuals used for the fitted population density in parameter_distributions.png
MAX_DENSITY_INDIVIDUALS = 2000
#: VPC binning: use the distinct design times when there are at most this many and each has enough points
MAX_DISTINCT_TIMES = 200
MIN_POINTS_PER_TIME = 5
N_TIME_BINS = 12
