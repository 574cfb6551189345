"""Stage input: real data sets in long format (NONMEM/Monolix convention), read and validated row by row.

Public API: :func:`read_dataset` (one reader for every model; options from a :class:`~amortized_nlme.config.DataConfig`),
:class:`Dataset` (validated per-individual records), :class:`ColumnMap` (which file column plays which role).
"""

from amortized_nlme.data.reader import DOSE_COLUMNS, ColumnMap, Dataset, read_dataset
from amortized_nlme.errors import DataError

__all__ = ["DOSE_COLUMNS", "ColumnMap", "DataError", "Dataset", "read_dataset"]
