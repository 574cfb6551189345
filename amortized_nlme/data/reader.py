"""Reading real data: long-format CSV in the NONMEM/Monolix convention, validated row by row.

A file has one row per record: ``ID, TIME, DV`` plus optional ``AMT, EVID, MDV, CMT`` and covariate columns
(column names configurable through :class:`ColumnMap`, matched case-insensitively). Every problem is reported as a
:class:`DataError` whose message names the file, the row as a user sees it in an editor (header = row 1, first data
row = row 2), the column and what was expected. Validation is vectorised so that million-row files read in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from amortized_nlme.errors import DataError

logger = logging.getLogger(__name__)

#: strings read as "missing" in addition to pandas' defaults ("." is NONMEM's missing-value marker)
_NA_VALUES = ["."]


@dataclass
class Dataset:
    """A validated data set, one entry per individual (in order of first appearance in the file).

    ``times[i]``/``dv[i]``/``obs_type[i]`` hold individual i's observation records (time-sorted, MDV=0 rows only);
    ``doses[i]`` is an array ``[m, 3]`` of dosing events (time, amount, compartment), possibly empty;
    ``covariates`` has one row per individual (time-constant covariates, indexed by id);
    ``groups`` maps each individual to a group label (e.g. reporter protein) when a group column is given;
    ``source_rows[i]`` gives the file row (header = row 1) of each of individual i's observations;
    ``obs_type_labels[k]`` is the file's value (CMT or observation-type column) for ``obs_type == k``;
    ``notes`` records what the reader skipped or dropped, for reports.
    """

    path: str
    ids: list[str]
    times: list[np.ndarray]
    dv: list[np.ndarray]
    obs_type: list[np.ndarray]
    doses: list[np.ndarray]
    covariates: pd.DataFrame
    groups: np.ndarray | None = None
    source_rows: list[np.ndarray] = field(default_factory=list)
    obs_type_labels: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def n_individuals(self) -> int:
        return len(self.ids)

    @property
    def n_observations(self) -> int:
        """Total number of observation records over all individuals."""
        return int(sum(t.size for t in self.times))

    def subset(self, indices: Sequence[int] | np.ndarray | slice) -> Dataset:
        """A new data set with the individuals ``indices`` (integer positions, a boolean mask or a slice)."""
        idx = np.arange(self.n_individuals)[indices] if isinstance(indices, slice) else np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (self.n_individuals,):
                raise IndexError(f"boolean mask of shape {idx.shape} for {self.n_individuals} individuals")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.n_individuals or idx.max() >= self.n_individuals):
            raise IndexError(f"individual index out of range for {self.n_individuals} individuals")
        pick = [int(i) for i in idx]
        return Dataset(
            path=self.path,
            ids=[self.ids[i] for i in pick],
            times=[self.times[i] for i in pick],
            dv=[self.dv[i] for i in pick],
            obs_type=[self.obs_type[i] for i in pick],
            doses=[self.doses[i] for i in pick],
            covariates=self.covariates.iloc[idx].copy(),
            groups=None if self.groups is None else self.groups[idx].copy(),
            source_rows=[self.source_rows[i] for i in pick] if self.source_rows else [],
            obs_type_labels=list(self.obs_type_labels),
            notes=list(self.notes),
        )

    def summary(self) -> str:
        """Human-readable overview: individuals, observations per individual, doses, groups, covariates."""
        counts = np.array([t.size for t in self.times], dtype=np.int64)
        n_doses = np.array([d.shape[0] for d in self.doses], dtype=np.int64)
        lines = [f"data set {self.path}", f"  individuals: {self.n_individuals}"]
        if counts.size:
            all_t = np.concatenate(self.times)
            lines.append(
                f"  observations: {int(counts.sum())} (per individual min {int(counts.min())}, "
                f"median {float(np.median(counts)):g}, max {int(counts.max())}); "
                f"times {float(all_t.min()):g} to {float(all_t.max()):g}"
            )
        if len(self.obs_type_labels) > 1:
            lines.append(f"  observation types: {', '.join(self.obs_type_labels)}")
        if n_doses.size and n_doses.sum() > 0:
            lines.append(f"  doses: {int(n_doses.sum())} (per individual min {int(n_doses.min())}, "
                         f"max {int(n_doses.max())})")
        else:
            lines.append("  doses: none")
        if self.groups is not None:
            labels, sizes = np.unique(self.groups.astype(str), return_counts=True)
            lines.append("  groups: " + ", ".join(f"{l} ({int(c)})" for l, c in zip(labels, sizes)))
        if self.covariates.shape[1]:
            for name in self.covariates.columns:
                col = self.covariates[name]
                if is_numeric_dtype(col) and not is_bool_dtype(col):
                    lines.append(f"  covariate {name}: numeric, min {col.min():g}, median {col.median():g}, "
                                 f"max {col.max():g}")
                else:
                    levels = col.astype(str).value_counts().sort_index()
                    shown = ", ".join(f"{k} ({int(v)})" for k, v in levels.head(10).items())
                    more = f", ... ({levels.size} levels)" if levels.size > 10 else ""
                    lines.append(f"  covariate {name}: categorical, {shown}{more}")
        else:
            lines.append("  covariates: none")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def content_hash(self) -> str:
        """sha256 over the validated content (not the path), stable across runs; keys cached posterior draws."""
        h = hashlib.sha256()

        def put_bytes(tag: str, payload: bytes) -> None:
            h.update(tag.encode())
            h.update(len(payload).to_bytes(8, "little"))
            h.update(payload)

        def put_strings(tag: str, values: Sequence[Any]) -> None:
            put_bytes(tag, "\x1f".join(str(v) for v in values).encode("utf-8"))

        def put_array(tag: str, arr: np.ndarray, dtype: str) -> None:
            a = np.ascontiguousarray(arr, dtype=dtype)
            put_bytes(tag + str(a.shape), a.tobytes())

        put_strings("ids", self.ids)
        for i in range(self.n_individuals):
            put_array("t", self.times[i], "<f8")
            put_array("y", self.dv[i], "<f8")
            put_array("k", self.obs_type[i], "<i8")
            put_array("d", np.asarray(self.doses[i]).reshape(-1, 3), "<f8")
        put_strings("obs_types", self.obs_type_labels)
        put_strings("covariate_names", [str(c) for c in self.covariates.columns])
        for name in self.covariates.columns:
            col = self.covariates[name]
            if is_numeric_dtype(col) and not is_bool_dtype(col):
                put_array("cn:" + str(name), col.to_numpy(dtype=np.float64), "<f8")
            else:
                put_strings("cs:" + str(name), col.astype(str).tolist())
        if self.groups is not None:
            put_strings("groups", self.groups.astype(str).tolist())
        return h.hexdigest()


@dataclass(frozen=True)
class ColumnMap:
    """Maps the reader's roles to the file's column names (matched case-insensitively).

    ``id``, ``time`` and ``dv`` are required. ``amt``, ``evid``, ``mdv`` and ``cmt`` default to ``None``:
    the columns ``AMT``/``EVID``/``MDV``/``CMT`` are used when the file has them; a name given explicitly
    must exist; ``""`` ignores the role even if such a column exists. ``obs_type`` names a column giving
    the observation type (e.g. ``DVID``/``YTYPE``); without it the observation rows' ``CMT`` is used.
    """

    id: str = "ID"
    time: str = "TIME"
    dv: str = "DV"
    amt: str | None = None
    evid: str | None = None
    mdv: str | None = None
    cmt: str | None = None
    obs_type: str | None = None

    @classmethod
    def from_dict(cls, mapping: Mapping[str, str | None]) -> ColumnMap:
        """Build from ``{role: column}`` (roles case-insensitive); unknown roles are refused."""
        roles = {f.name for f in fields(cls)}
        kwargs: dict[str, str | None] = {}
        for key, value in mapping.items():
            role = str(key).strip().lower()
            if role not in roles:
                raise DataError(f"column map: unknown role {key!r}; expected one of {', '.join(sorted(roles))}")
            if value is not None and not isinstance(value, str):
                raise DataError(f"column map: role {key!r} must map to a column name (string), got {value!r}")
            kwargs[role] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, str | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------------------------------- helpers


def _rows(lines: np.ndarray, limit: int = 5) -> str:
    """'row 7' / 'rows 7, 9 and 12' / 'rows 7, 9, ... (40 rows)' for file line numbers."""
    lines = [int(x) for x in np.asarray(lines).reshape(-1)]
    if len(lines) == 1:
        return f"row {lines[0]}"
    if len(lines) <= limit:
        return "rows " + ", ".join(map(str, lines[:-1])) + f" and {lines[-1]}"
    return "rows " + ", ".join(map(str, lines[:limit])) + f", ... ({len(lines)} rows)"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "an empty cell"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return repr(str(value)) if isinstance(value, str) else str(value)


class _Reader:
    """State for one read: the raw frame, file line numbers and resolved column names."""

    def __init__(self, path: str, df: pd.DataFrame, lines: np.ndarray):
        self.path = path
        self.df = df
        self.lines = lines  # file line number of each row of df

    def error(self, where: np.ndarray | int | str, column: str | None, message: str) -> DataError:
        if isinstance(where, str):
            loc = where
        else:
            loc = _rows(np.atleast_1d(where))
        col = f", column {column}" if column else ""
        return DataError(f"{self.path}, {loc}{col}: {message}")

    def numeric(self, column: str, expected: str) -> np.ndarray:
        """Column as float64; non-numeric or infinite entries are refused (empty cells become NaN)."""
        s = self.df[column]
        if is_numeric_dtype(s) and not is_bool_dtype(s):
            vals = s.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            text = s.astype("object")
            present = s.notna().to_numpy()
            stripped = text.where(~present, text.astype(str).str.strip())
            vals = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            bad = np.flatnonzero(np.isnan(vals) & present)
            if bad.size:
                raise self.error(self.lines[bad], column,
                                 f"expected {expected}, got {_fmt(str(text.iloc[bad[0]]))}")
        bad = np.flatnonzero(np.isinf(vals))
        if bad.size:
            raise self.error(self.lines[bad], column, f"expected {expected} (finite), got {_fmt(vals[bad[0]])}")
        return vals

    def strings(self, column: str) -> np.ndarray:
        """Column as an object array of stripped strings, None for empty cells."""
        s = self.df[column]
        present = s.notna().to_numpy()
        if is_numeric_dtype(s) and not is_bool_dtype(s):
            v = s.to_numpy(dtype=np.float64, na_value=np.nan)
            out = np.array([f"{x:g}" if float(x).is_integer() else repr(float(x)) for x in v], dtype=object)
        else:
            # strip the distinct values only: much faster than a per-row .str.strip() on a million rows
            codes, uniques = pd.factorize(s.astype("object"), use_na_sentinel=True)
            stripped = np.array([str(u).strip() for u in uniques] + [""], dtype=object)
            out = stripped[codes]  # code -1 (missing) picks the trailing ""
        out[~present] = None
        out[present & (out == "")] = None
        return out


def _read_frame(path: str, string_columns: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Read the CSV (pandas), mapping every parser failure to a DataError; returns frame and line numbers."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a CSV file")
    try:
        header = pd.read_csv(path, nrows=0, encoding="utf-8-sig")
        names = [str(c) for c in header.columns]
        wanted = {c.strip().lower() for c in string_columns}
        dtype = {c: str for c in names if c.strip().lower() in wanted}
        df = pd.read_csv(path, dtype=dtype, na_values=_NA_VALUES, skip_blank_lines=False,
                         encoding="utf-8-sig", low_memory=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}, row 1: the file is empty; expected a header row (e.g. ID,TIME,DV) "
                        "followed by data rows") from None
    except pd.errors.ParserError as e:
        msg = str(e).strip()
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", msg)
        if m:
            raise DataError(f"{path}, row {m.group(2)}: expected {m.group(1)} fields (as in the header), "
                            f"found {m.group(3)}; check for a stray separator or an unquoted comma") from None
        raise DataError(f"{path}: could not parse as CSV ({msg.splitlines()[-1] if msg else type(e).__name__})") \
            from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); expected a CSV file") \
            from None
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: could not read the file ({type(e).__name__}: {e})") from None
    df.columns = [str(c).strip().lstrip("\ufeff") for c in df.columns]
    lines = np.arange(len(df), dtype=np.int64) + 2
    blank = df.isna().all(axis=1).to_numpy()
    if blank.any():
        logger.info("%s: ignoring %d blank line(s)", path, int(blank.sum()))
        df = df.loc[~blank].reset_index(drop=True)
        lines = lines[~blank]
    if len(df) == 0:
        raise DataError(f"{path}, row 2: the file has a header but no data rows; expected at least one record")
    return df, lines


def _resolve(path: str, columns: Sequence[str], name: str, role: str) -> str:
    """The file's column matching ``name`` case-insensitively, or a DataError listing the file's columns."""
    hits = [c for c in columns if c.lower() == name.strip().lower()]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise DataError(f"{path}, row 1 (header), column {name}: several columns match {name!r} "
                        f"ignoring case ({', '.join(hits)}); expected exactly one")
    raise DataError(f"{path}, row 1 (header), column {name}: required column {name!r} ({role}) is missing; "
                    f"the file has columns: {', '.join(columns)}")


def _optional(path: str, columns: Sequence[str], name: str | None, default: str, role: str) -> str | None:
    if name == "":
        return None
    if name is None:
        hits = [c for c in columns if c.lower() == default.lower()]
        return hits[0] if len(hits) == 1 else (_resolve(path, columns, default, role) if hits else None)
    return _resolve(path, columns, name, role)


# ---------------------------------------------------------------------------------------------------- reader


def read_dataset(
    path: str | os.PathLike[str],
    columns: ColumnMap | Mapping[str, str | None] | None = None,
    *,
    covariates: Sequence[str] | None = None,
    categorical: Sequence[str] | None = None,
    group: str | None = None,
    dose_column: str | None = None,
    dose_scale_column: str | None = None,
    dose_time: float = 0.0,
    dose_cmt: int = 1,
    drop_predose: bool = False,
    n_obs_types: int = 1,
) -> Dataset:
    """Read and validate a long-format CSV (also ``.csv.gz``) in the NONMEM/Monolix convention.

    Dosing records are rows with EVID=1 (or 4), or — without EVID — AMT>0 together with MDV=1 or an empty DV.
    Other MDV=1 rows and EVID=2/3 rows are skipped as NONMEM does (counted, logged and kept in ``notes``).
    ``dose_column`` instead gives one dose per individual at ``dose_time`` into compartment ``dose_cmt``
    (multiplied by ``dose_scale_column``, e.g. mg/kg times body weight). ``covariates`` must be constant within
    an individual (``categorical`` ones are kept as strings, others must be numeric unless non-numeric text makes
    them categorical); ``group`` gives one label per individual. ``drop_predose`` drops observations at or before
    an individual's first dose. The observation type comes from the ``obs_type`` column or ``CMT`` and must take
    exactly ``n_obs_types`` distinct values. Any problem raises :class:`DataError` naming file, row and column.
    """
    path = os.fspath(path)
    cmap = ColumnMap.from_dict(columns) if isinstance(columns, Mapping) else (columns or ColumnMap())
    covariates = list(covariates or [])
    categorical = list(categorical or [])
    if n_obs_types < 1:
        raise DataError(f"{path}: n_obs_types must be at least 1, got {n_obs_types}")
    for c in categorical:
        if c.lower() not in {x.lower() for x in covariates}:
            covariates.append(c)

    str_cols = [cmap.id] + ([group] if group else []) + categorical
    df, lines = _read_frame(path, str_cols)
    cols = list(df.columns)
    rd = _Reader(path, df, lines)

    c_id = _resolve(path, cols, cmap.id, "individual id")
    c_time = _resolve(path, cols, cmap.time, "time")
    c_dv = _resolve(path, cols, cmap.dv, "dependent variable")
    c_amt = _optional(path, cols, cmap.amt, "AMT", "dose amount")
    c_evid = _optional(path, cols, cmap.evid, "EVID", "event id")
    c_mdv = _optional(path, cols, cmap.mdv, "MDV", "missing dependent variable flag")
    c_cmt = _optional(path, cols, cmap.cmt, "CMT", "compartment")
    c_otype = _resolve(path, cols, cmap.obs_type, "observation type") if cmap.obs_type else None
    c_group = _resolve(path, cols, group, "group") if group else None
    c_dose = _resolve(path, cols, dose_column, "dose per individual") if dose_column else None
    c_scale = _resolve(path, cols, dose_scale_column, "dose multiplier") if dose_scale_column else None
    c_covs = [_resolve(path, cols, c, "covariate") for c in covariates]
    cat_lower = {c.lower() for c in categorical}
    if len(set(c_covs)) != len(c_covs):
        raise DataError(f"{path}, row 1 (header): covariate listed twice: {covariates}")
    n = len(df)

    # --- per-row values ------------------------------------------------------------------------------------
    ids = rd.strings(c_id)
    bad = np.flatnonzero(pd.isna(ids))
    if bad.size:
        raise rd.error(lines[bad], c_id, "expected an individual ID, got an empty cell")
    time = rd.numeric(c_time, "a number (time)")
    bad = np.flatnonzero(np.isnan(time))
    if bad.size:
        raise rd.error(lines[bad], c_time, "expected a time, got an empty cell")
    bad = np.flatnonzero(time < 0)
    if bad.size:
        raise rd.error(lines[bad], c_time, f"expected a time >= 0, got {_fmt(time[bad[0]])}")
    dv = rd.numeric(c_dv, "a number (observation) or an empty cell / '.' on non-observation rows")
    amt = rd.numeric(c_amt, "a number (dose amount)") if c_amt else np.full(n, np.nan)
    bad = np.flatnonzero(amt < 0)
    if bad.size:
        raise rd.error(lines[bad], c_amt, f"expected a dose amount >= 0, got {_fmt(amt[bad[0]])}")
    if c_mdv:
        mdv_raw = rd.numeric(c_mdv, "0 or 1")
        bad = np.flatnonzero(~np.isnan(mdv_raw) & (mdv_raw != 0) & (mdv_raw != 1))
        if bad.size:
            raise rd.error(lines[bad], c_mdv, f"expected 0 or 1, got {_fmt(mdv_raw[bad[0]])}")
        mdv = mdv_raw == 1
    else:
        mdv = np.zeros(n, dtype=bool)
    has_amt = np.nan_to_num(amt) > 0
    if c_evid:
        evid = rd.numeric(c_evid, "an event id 0-4")
        bad = np.flatnonzero(np.isnan(evid) | ~np.isin(evid, [0, 1, 2, 3, 4]))
        if bad.size:
            raise rd.error(lines[bad], c_evid,
                           f"expected an event id 0 (observation), 1 (dose), 2 (other), 3 (reset) or 4 "
                           f"(reset and dose), got {_fmt(evid[bad[0]])}")
        is_dose = np.isin(evid, [1, 4])
        other = np.isin(evid, [2, 3])
        bad = np.flatnonzero(is_dose & ~has_amt)
        if bad.size:
            raise rd.error(lines[bad], c_amt or "AMT",
                           f"EVID={int(evid[bad[0]])} marks a dose record; expected an amount > 0, "
                           f"got {_fmt(amt[bad[0]])}")
        bad = np.flatnonzero((evid == 0) & has_amt)
        if bad.size:
            raise rd.error(lines[bad], c_amt,
                           f"EVID=0 marks an observation; expected AMT empty or 0, got {_fmt(amt[bad[0]])}")
        if np.any(evid == 4):
            logger.warning("%s: %d EVID=4 record(s) read as doses; system resets are not modelled",
                           path, int(np.sum(evid == 4)))
    else:
        is_dose = has_amt & (mdv | np.isnan(dv))
        other = np.zeros(n, dtype=bool)
        bad = np.flatnonzero(has_amt & ~is_dose)
        if bad.size:
            raise rd.error(lines[bad], c_amt,
                           f"AMT={_fmt(amt[bad[0]])} on a row with an observation (DV={_fmt(dv[bad[0]])}"
                           f"{', MDV=0' if c_mdv else ''}); expected a dose record (MDV=1 or empty DV, or an "
                           f"EVID column with EVID=1) or AMT empty/0 on observation rows")
    skipped = ~is_dose & (other | mdv)
    is_obs = ~is_dose & ~skipped
    bad = np.flatnonzero(is_obs & np.isnan(dv))
    if bad.size:
        raise rd.error(lines[bad], c_dv,
                       "expected a numeric observation, got an empty/NaN value on an observation row "
                       "(mark records without observation with MDV=1 or EVID=2)")
    if c_dose is not None and is_dose.any():
        raise rd.error(lines[np.flatnonzero(is_dose)], c_amt or c_evid,
                       f"dose records found although doses are taken from column {c_dose}; expected one or "
                       "the other")

    # --- individuals: contiguous blocks -------------------------------------------------------------------
    codes, uniq = pd.factorize(ids)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    block_codes = codes[starts]
    if block_codes.size != uniq.size:
        seen_max = np.maximum.accumulate(block_codes)
        k = int(np.flatnonzero(block_codes[1:] <= seen_max[:-1])[0]) + 1
        row0 = starts[k]
        prev = starts[np.flatnonzero(block_codes[:k] == block_codes[k])[-1]]
        prev_end = (starts[np.flatnonzero(block_codes[:k] == block_codes[k])[-1] + 1]) - 1
        raise rd.error(lines[row0], c_id,
                       f"ID {uniq[block_codes[k]]!r} appears again after other IDs (its earlier rows are "
                       f"{lines[prev]}-{lines[prev_end]}); expected all rows of an individual in one contiguous "
                       "block")
    n_ind = uniq.size
    ends = np.r_[starts[1:], n]
    sizes = ends - starts
    first_row = np.repeat(starts, sizes)  # row index of each row's individual's first row

    # --- time order within individual ---------------------------------------------------------------------
    same = np.r_[False, codes[1:] == codes[:-1]]
    dec = np.flatnonzero(same & (np.r_[0.0, np.diff(time)] < 0))
    if dec.size:
        r = dec[0]
        raise rd.error(lines[r], c_time,
                       f"time decreases within ID {ids[r]!r} ({_fmt(time[r - 1])} in row {lines[r - 1]}, then "
                       f"{_fmt(time[r])}); expected the rows of each individual sorted by time")

    # --- per-individual constants: group, covariates, dose column -----------------------------------------
    def constant(column: str, values: np.ndarray, what: str) -> np.ndarray:
        """Per-individual value of a column that must be given on every row and constant within an individual."""
        missing = pd.isna(values) if values.dtype == object else np.isnan(values)
        bad_rows = np.flatnonzero(missing)
        if bad_rows.size:
            r = bad_rows[0]
            raise rd.error(lines[bad_rows], column,
                           f"expected a value for {what} on every row, got an empty cell (ID {ids[r]!r})")
        ref = values[first_row]
        diff = np.flatnonzero(values != ref)
        if diff.size:
            r = diff[0]
            f = first_row[r]
            raise rd.error(lines[diff], column,
                           f"{what} must be constant within an individual: ID {ids[r]!r} has {_fmt(values[f])} "
                           f"in row {lines[f]} but {_fmt(values[r])} in row {lines[r]}")
        return values[starts]

    groups = None
    if c_group:
        groups = constant(c_group, rd.strings(c_group), "the group").astype(object)
    cov_frame = pd.DataFrame(index=pd.Index([str(u) for u in uniq], name="id"))
    for name, col in zip(covariates, c_covs):
        if name.lower() in cat_lower:
            cov_frame[col] = pd.Series(constant(col, rd.strings(col), f"covariate {col}"), index=cov_frame.index,
                                       dtype=object)
            continue
        s = df[col]
        if is_numeric_dtype(s) and not is_bool_dtype(s):
            cov_frame[col] = constant(col, rd.numeric(col, "a number"), f"covariate {col}")
        else:
            logger.info("%s: covariate %s is not numeric; read as categorical", path, col)
            cov_frame[col] = pd.Series(constant(col, rd.strings(col), f"covariate {col}"), index=cov_frame.index,
                                       dtype=object)

    # --- doses ----------------------------------------------------------------------------------------------
    dose_lists: list[np.ndarray]
    if c_dose is not None:
        per_dose = constant(c_dose, rd.numeric(c_dose, "a number (dose)"), f"dose column {c_dose}")
        bad = np.flatnonzero(per_dose <= 0)
        if bad.size:
            raise rd.error(lines[starts[bad]], c_dose, f"expected a dose > 0, got {_fmt(per_dose[bad[0]])}")
        if c_scale is not None:
            scale = constant(c_scale, rd.numeric(c_scale, "a number (dose multiplier)"),
                             f"dose multiplier {c_scale}")
            bad = np.flatnonzero(scale <= 0)
            if bad.size:
                raise rd.error(lines[starts[bad]], c_scale, f"expected a dose multiplier > 0, got "
                                                            f"{_fmt(scale[bad[0]])}")
            per_dose = per_dose * scale
        dose_lists = [np.array([[float(dose_time), float(a), float(dose_cmt)]]) for a in per_dose]
        first_dose = np.full(n_ind, float(dose_time))
    else:
        if c_scale is not None:
            raise DataError(f"{path}: dose_scale_column={dose_scale_column!r} needs dose_column")
        cmt_vals = rd.numeric(c_cmt, "a compartment number") if c_cmt else np.full(n, np.nan)
        d_rows = np.flatnonzero(is_dose)
        d_cmt = np.where(np.isnan(cmt_vals[d_rows]), 1.0, cmt_vals[d_rows])
        d_arr = np.column_stack([time[d_rows], amt[d_rows], d_cmt]) if d_rows.size else np.zeros((0, 3))
        d_code = codes[d_rows]
        d_split = np.searchsorted(d_code, np.arange(1, n_ind))
        dose_lists = [a.copy() for a in np.split(d_arr, d_split)]
        first_dose = np.full(n_ind, np.inf)
        if d_rows.size:
            np.minimum.at(first_dose, d_code, time[d_rows])

    # --- observation types ----------------------------------------------------------------------------------
    notes: list[str] = []
    n_skip = int(skipped.sum())
    if n_skip:
        msg = (f"skipped {n_skip} record(s) without observation and without dose (MDV=1 or EVID=2/3), "
               f"e.g. {_rows(lines[np.flatnonzero(skipped)])}")
        logger.warning("%s: %s", path, msg)
        notes.append(msg)
    if drop_predose:
        pre = is_obs & (time <= first_dose[codes])
        n_pre = int(pre.sum())
        if n_pre:
            msg = f"dropped {n_pre} pre-dose observation(s) (time <= first dose time), as requested"
            logger.info("%s: %s", path, msg)
            notes.append(msg)
            is_obs = is_obs & ~pre
    else:
        pre = np.zeros(n, dtype=bool)

    obs_rows = np.flatnonzero(is_obs)
    obs_code = codes[obs_rows]
    counts = np.bincount(obs_code, minlength=n_ind)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        k = empty[0]
        why = (" after dropping pre-dose observations" if drop_predose and pre[starts[k]:ends[k]].any() else "")
        span = (f"row {lines[starts[k]]}" if sizes[k] == 1 else f"rows {lines[starts[k]]}-{lines[ends[k] - 1]}")
        raise rd.error(span, c_dv,
                       f"ID {uniq[k]!r} has no observation records{why} (only dose or MDV=1 records); expected at "
                       f"least one observation per individual"
                       + (f" ({empty.size} IDs affected)" if empty.size > 1 else ""))

    c_type = c_otype or c_cmt
    if c_type is not None:
        if c_otype:
            tvals = rd.strings(c_otype)[obs_rows]
            missing = pd.isna(tvals)
        else:
            num = rd.numeric(c_cmt, "a compartment number")[obs_rows]
            missing = np.isnan(num)
        if missing.all() and n_obs_types == 1:
            labels: list[str] = []
            otype = np.zeros(obs_rows.size, dtype=np.int64)
        elif missing.any():
            raise rd.error(lines[obs_rows[np.flatnonzero(missing)]], c_type,
                           "expected an observation type on every observation row, got an empty cell")
        else:
            if c_otype:
                codes_t, found_labels = pd.factorize(tvals)
                found = [str(x) for x in found_labels]
            else:
                values, codes_t = np.unique(num, return_inverse=True)
                found = [f"{x:g}" for x in values]
            order = sorted(range(len(found)), key=lambda j: _sort_key(found[j]))
            remap = np.empty(len(order), dtype=np.int64)
            remap[order] = np.arange(len(order))
            otype = remap[codes_t.reshape(-1)]
            labels = [found[j] for j in order]
            if len(labels) != n_obs_types:
                firsts = [int(obs_rows[np.argmax(otype == k)]) for k in range(len(labels))]
                listed = ", ".join(f"{l} (first in row {lines[r]})" for l, r in zip(labels, firsts))
                where = lines[firsts[n_obs_types]] if len(labels) > n_obs_types else lines[firsts[0]]
                raise rd.error(int(where), c_type,
                               f"expected {n_obs_types} observation type(s), found {len(labels)} on observation "
                               f"rows: {listed}")
    else:
        if n_obs_types != 1:
            raise rd.error("row 1 (header)", "CMT",
                           f"expected {n_obs_types} observation types, but the file has no CMT column and no "
                           f"observation-type column was given; the file has columns: {', '.join(cols)}")
        labels = []
        otype = np.zeros(obs_rows.size, dtype=np.int64)

    split = np.cumsum(counts)[:-1]
    t_obs, y_obs = time[obs_rows], dv[obs_rows]
    data = Dataset(
        path=path,
        ids=[str(u) for u in uniq],
        times=[a.copy() for a in np.split(t_obs, split)],
        dv=[a.copy() for a in np.split(y_obs, split)],
        obs_type=[a.copy() for a in np.split(otype, split)],
        doses=dose_lists,
        covariates=cov_frame,
        groups=None if groups is None else np.asarray(groups, dtype=object),
        source_rows=[a.copy() for a in np.split(lines[obs_rows], split)],
        obs_type_labels=labels,
        notes=notes,
    )
    logger.info("%s: read %d individuals, %d observations", path, data.n_individuals, data.n_observations)
    return data


def _sort_key(label: Any) -> tuple[int, float, str]:
    """Numeric labels in numeric order, then text labels alphabetically."""
    try:
        return (0, float(label), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(label))
