"""Reading real data: long-format CSV in the NONMEM/Monolix convention, validated row by row.

A file has one row per record: ``ID, TIME, DV`` plus optional NONMEM data items ``AMT, EVID, MDV, CMT, RATE, DUR,
SS, II, ADDL``, censoring columns ``CENS``/``LLOQ`` and covariate columns (column names configurable through
:class:`ColumnMap`, matched case-insensitively). Records are read as NM-TRAN reads them (see :func:`read_dataset`);
what this reader does not support is refused. Every problem is reported as a :class:`DataError` whose message names
the file, the row as a user sees it in an editor (header = row 1, first data row = row 2), the column and what was
expected. Validation is vectorised so that million-row files read in seconds.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import logging
import lzma
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

#: columns of a dose array ``Dataset.doses[i]`` (float64, ``[m, 7]``):
#:
#: - ``time``: when the dose is given (or the system reset);
#: - ``amount``: the dose (AMT); 0 on a pure reset record (EVID=3);
#: - ``cmt``: the file's CMT value; 0 = the model's default dose compartment (no CMT column, or CMT empty/0). The
#:   model maps compartments to routes;
#: - ``duration``: 0 for a bolus; > 0 for a zero-order infusion of ``amount`` over ``duration`` (RATE > 0 gives
#:   AMT/RATE, RATE=-2 the DUR column);
#: - ``ss``: 1 for a NONMEM SS=1 steady-state dose: the system is reset and placed at the steady state of doses of
#:   ``amount`` (same cmt and duration) every ``ii``, this dose included; 0 otherwise;
#: - ``ii``: the dosing interval of a steady-state dose (0 when ``ss`` is 0; ADDL doses are expanded into rows);
#: - ``reset``: 1 when the system is reset (all compartments emptied) at ``time`` before this row's dose is given
#:   (EVID=3: reset only, amount 0; EVID=4: reset and dose); 0 otherwise.
#:
#: Rows are sorted by time; at equal times they keep the file's order, and additional (ADDL) doses come after the
#: file's records. A model applies them in this order.
DOSE_COLUMNS = ("time", "amount", "cmt", "duration", "ss", "ii", "reset")
_N_DOSE_COLUMNS = len(DOSE_COLUMNS)

#: most additional (ADDL) doses expanded from one file (a guard against a typo such as ADDL=1e9)
_MAX_ADDL_DOSES = 5_000_000


def _empty_doses() -> np.ndarray:
    return np.zeros((0, _N_DOSE_COLUMNS))


def _as_dose_array(d: Any) -> np.ndarray:
    """A dose array ``[m, 7]``; a legacy ``[m, 3]`` array (time, amount, cmt) is widened with bolus defaults."""
    a = np.asarray(d, dtype=np.float64)
    if a.size == 0:
        return _empty_doses()
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2 or a.shape[1] not in (3, _N_DOSE_COLUMNS):
        raise ValueError(f"dose array of shape {a.shape}; expected [m, {_N_DOSE_COLUMNS}] with columns "
                         f"{', '.join(DOSE_COLUMNS)} (or a legacy [m, 3]: time, amount, cmt)")
    if a.shape[1] == 3:
        a = np.column_stack([a, np.zeros((a.shape[0], _N_DOSE_COLUMNS - 3))])
    return a


@dataclass
class Dataset:
    """A validated data set, one entry per individual (in order of first appearance in the file).

    ``times[i]``/``dv[i]``/``obs_type[i]`` hold individual i's observation records (time-sorted);
    ``censored[i]`` flags observations below the lower limit of quantification (BLQ, for Beal's M3 likelihood
    P(y < LLOQ)); ``lloq[i]`` gives their limit (NaN where not censored), and ``dv[i]`` holds the same limit there;
    ``doses[i]`` is a float64 array ``[m, 7]`` of dose and reset events with the columns :data:`DOSE_COLUMNS`
    (time, amount, cmt, duration, ss, ii, reset), possibly empty; ``dose_rows[i]`` gives the file row of the record
    behind each dose (the initiating record for additional ADDL doses);
    ``covariates`` has one row per individual (time-constant covariates, indexed by id);
    ``groups`` maps each individual to a group label (e.g. reporter protein) when a group column is given;
    ``source_rows[i]`` gives the file row (header = row 1) of each of individual i's observations;
    ``obs_type_labels[k]`` is the file's value (CMT or observation-type column) for ``obs_type == k``;
    ``notes`` records what the reader skipped or dropped, for reports.

    The dose arrays keep times only: an observation at exactly the time of a dose does not say whether its record
    came before or after the dose record (NONMEM applies a dose record before an observation record that follows
    it); the reader lists such observations in ``notes``.
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
    censored: list[np.ndarray] = field(default_factory=list)
    lloq: list[np.ndarray] = field(default_factory=list)
    dose_rows: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.doses = [_as_dose_array(d) for d in self.doses]
        if not self.censored:
            self.censored = [np.zeros(np.asarray(t).size, dtype=bool) for t in self.times]
        if not self.lloq:
            self.lloq = [np.full(np.asarray(t).size, np.nan) for t in self.times]
        for name in ("times", "dv", "obs_type", "doses", "censored", "lloq"):
            if len(getattr(self, name)) != len(self.ids):
                raise ValueError(f"Dataset.{name} has {len(getattr(self, name))} entries for {len(self.ids)} "
                                 "individuals")

    @property
    def n_individuals(self) -> int:
        return len(self.ids)

    @property
    def n_observations(self) -> int:
        """Total number of observation records over all individuals (censored ones included)."""
        return int(sum(t.size for t in self.times))

    @property
    def n_censored(self) -> int:
        """Number of observations below the lower limit of quantification (censored, BLQ)."""
        return int(sum(int(np.count_nonzero(c)) for c in self.censored))

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
            censored=[self.censored[i] for i in pick],
            lloq=[self.lloq[i] for i in pick],
            dose_rows=[self.dose_rows[i] for i in pick] if self.dose_rows else [],
        )

    def dose_counts(self) -> dict[str, int]:
        """Counts over all individuals: dose records (amount > 0), infusions, steady-state doses, doses added by ADDL
        expansion (-1 when unknown: no ``dose_rows``), resets (EVID=3 or 4) and censored (BLQ) observations."""
        all_d = np.concatenate(self.doses) if self.doses else _empty_doses()
        if self.dose_rows and len(self.dose_rows) == len(self.doses):
            n_addl = int(sum(r.size - np.unique(r).size for r in self.dose_rows))
        else:
            n_addl = -1
        given = all_d[:, 1] > 0
        return {
            "doses": int(np.count_nonzero(given)),
            "infusions": int(np.count_nonzero(given & (all_d[:, 3] > 0))),
            "steady_state": int(np.count_nonzero(given & (all_d[:, 4] == 1))),
            "addl": n_addl,
            "resets": int(np.count_nonzero(all_d[:, 6] == 1)),
            "censored": self.n_censored,
        }

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
        c = self.dose_counts()
        n_censored = c["censored"]
        if counts.size and n_censored:
            lines.append(f"  censored observations (below LLOQ, BLQ): {n_censored} of {int(counts.sum())} "
                         f"({100.0 * n_censored / max(int(counts.sum()), 1):.1f}%)")
        else:
            lines.append("  censored observations (below LLOQ, BLQ): none")
        if n_doses.size and n_doses.sum() > 0:
            addl = "unknown" if c["addl"] < 0 else str(c["addl"])
            lines.append(f"  doses: {c['doses']} (dose events per individual min {int(n_doses.min())}, "
                         f"max {int(n_doses.max())}); infusions {c['infusions']}, steady-state doses "
                         f"{c['steady_state']}, added by ADDL expansion {addl}, resets {c['resets']}")
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
            put_array("d", _as_dose_array(self.doses[i]), "<f8")
            put_array("c", self.censored[i], "u1")
            put_array("l", self.lloq[i], "<f8")
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

    ``id``, ``time`` and ``dv`` are required. The optional roles default to ``None``: the column with the role's
    NONMEM/Monolix name is used when the file has one (``amt``: AMT, ``evid``: EVID, ``mdv``: MDV, ``cmt``: CMT,
    ``rate``: RATE, ``dur``: DUR, ``ss``: SS, ``ii``: II, ``addl``: ADDL, ``cens``: CENS, ``lloq``: LLOQ,
    ``limit``: LIMIT); a name given explicitly must exist; ``""`` ignores the role even if such a column exists.
    ``obs_type`` names a column giving the observation type (e.g. ``DVID``/``YTYPE``); without it the observation
    rows' ``CMT`` is used.

    ``LIMIT`` is not an alias of ``LLOQ``: in Monolix it is the other bound of a censoring interval (for CENS=1 the
    lower bound, often 0), and interval censoring is refused; a column that gives the limit of quantification is
    mapped with ``lloq=...``.
    """

    id: str = "ID"
    time: str = "TIME"
    dv: str = "DV"
    amt: str | None = None
    evid: str | None = None
    mdv: str | None = None
    cmt: str | None = None
    obs_type: str | None = None
    rate: str | None = None
    dur: str | None = None
    ss: str | None = None
    ii: str | None = None
    addl: str | None = None
    cens: str | None = None
    lloq: str | None = None
    limit: str | None = None

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


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_PANDAS_ONLY = {".zip", ".zst", ".tar"}  # compressions read by pandas directly (no comment-record scan)
_BOM = b"\xef\xbb\xbf"


def _read_raw(path: str) -> bytes | None:
    """The file's bytes (decompressed by extension), or None for formats left to pandas."""
    ext = os.path.splitext(path)[1].lower()
    if ext in _PANDAS_ONLY or ".tar." in os.path.basename(path).lower():
        return None
    opener = _OPENERS.get(ext)
    try:
        if opener is None:
            with open(path, "rb") as f:
                return f.read()
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{path}: could not read the file ({type(e).__name__}: {e})") from None


def _strip_comments(raw: bytes) -> tuple[bytes, np.ndarray, np.ndarray, bool]:
    """Drop comment records as NM-TRAN's IGNORE does: lines after the header whose first character is '#' (NM-TRAN's
    default) or '@'. A header line starting with '#'/'@' (a header hidden from NM-TRAN) loses that character.

    Returns the remaining text, the file line number (1-based) of each remaining line, the line numbers of the
    dropped comment records and whether the header's marker was stripped.
    """
    head = len(_BOM) if raw.startswith(_BOM) else 0
    header_marked = raw[head:head + 1] in (b"#", b"@")
    if header_marked:
        raw = raw[:head] + raw[head + 1:]
    if b"#" not in raw and b"@" not in raw:
        n_lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)
        return raw, np.arange(1, n_lines + 1), np.zeros(0, dtype=np.int64), header_marked
    buf = np.frombuffer(raw, dtype=np.uint8)
    starts = np.r_[0, np.flatnonzero(buf == 10) + 1]
    starts = starts[starts < len(raw)]
    first = buf[starts]
    comment = (first == ord("#")) | (first == ord("@"))
    comment[0] = False  # the header
    line_no = np.arange(1, starts.size + 1)
    if not comment.any():
        return raw, line_no, np.zeros(0, dtype=np.int64), header_marked
    ends = np.r_[starts[1:], len(raw)]
    parts, prev = [], 0
    for k in np.flatnonzero(comment):
        parts.append(raw[prev:starts[k]])
        prev = int(ends[k])
    parts.append(raw[prev:])
    return b"".join(parts), line_no[~comment], line_no[comment], header_marked


def _read_frame(path: str, string_columns: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Read the CSV (pandas), mapping every parser failure to a DataError.

    Returns the frame, the file line number of each of its rows and the line numbers of skipped comment records.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a CSV file")
    raw = _read_raw(path)
    comments = np.zeros(0, dtype=np.int64)
    kept: np.ndarray | None = None
    text = b""
    if raw is not None:
        text, kept, comments, header_marked = _strip_comments(raw)
        if header_marked:
            logger.info("%s: header row starts with a comment marker; read as the header", path)

    def source() -> Any:
        return path if raw is None else io.BytesIO(text)

    try:
        header = pd.read_csv(source(), nrows=0, encoding="utf-8-sig")
        names = [str(c) for c in header.columns]
        wanted = {c.strip().lower() for c in string_columns}
        dtype = {c: str for c in names if c.strip().lstrip("\ufeff").lower() in wanted}
        df = pd.read_csv(source(), dtype=dtype, na_values=_NA_VALUES, skip_blank_lines=False,
                         encoding="utf-8-sig", low_memory=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}, row 1: the file is empty; expected a header row (e.g. ID,TIME,DV) "
                        "followed by data rows") from None
    except pd.errors.ParserError as e:
        msg = str(e).strip()
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", msg)
        if m:
            line = int(m.group(2))
            if kept is not None and 0 < line <= kept.size:
                line = int(kept[line - 1])
            raise DataError(f"{path}, row {line}: expected {m.group(1)} fields (as in the header), "
                            f"found {m.group(3)}; check for a stray separator or an unquoted comma") from None
        raise DataError(f"{path}: could not parse as CSV ({msg.splitlines()[-1] if msg else type(e).__name__})") \
            from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); expected a CSV file") \
            from None
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: could not read the file ({type(e).__name__}: {e})") from None
    df.columns = [str(c).strip().lstrip("\ufeff") for c in df.columns]
    if kept is not None and kept.size - 1 >= len(df):
        lines = np.asarray(kept[1:1 + len(df)], dtype=np.int64)
    else:
        lines = np.arange(len(df), dtype=np.int64) + 2
    blank = df.isna().all(axis=1).to_numpy()
    if blank.any():
        logger.info("%s: ignoring %d blank line(s)", path, int(blank.sum()))
        df = df.loc[~blank].reset_index(drop=True)
        lines = lines[~blank]
    if len(df) == 0:
        raise DataError(f"{path}, row 2: the file has a header but no data rows; expected at least one record")
    return df, lines, comments


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


def _is_whole(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x) & (np.floor(x) == x)


# ---------------------------------------------------------------------------------------------------- reader

#: names of columns that usually flag below-LLOQ records in NONMEM data sets; NM-TRAN does not interpret them (the
#: control stream does), so the reader notes them when they are not mapped to a role
_BLQ_FLAG_NAMES = {"blq", "bql", "bloq", "blqflag", "loqflag"}
#: NM-TRAN's day-time translation items (combined with TIME when $INPUT labels them so); noted when present
_DATE_NAMES = {"date", "dat1", "dat2", "dat3"}


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

    Records are classified as NM-TRAN does. With an EVID column: 0 observation, 1 dose, 2 other-type event
    (skipped, counted in ``notes``), 3 reset (a dose-array row with amount 0 and reset = 1), 4 reset and dose.
    Without EVID, a record with AMT > 0 is a dose record whatever its DV (NM-TRAN sets MDV=1 there, e.g. DV = 0 on
    the dose rows of the phenobarbital data); other records are observations, or skipped when MDV=1. NONMEM requires
    MDV=1 on dose, other-type and reset records, so MDV=0 there is refused.

    Doses (see :data:`DOSE_COLUMNS`): CMT gives the compartment (0 or empty: the model's default); RATE > 0 makes an
    infusion of duration AMT/RATE, RATE=-2 takes the duration from the DUR column (a control stream's D1 = DUR);
    ADDL = k adds k doses at TIME + j*II (j = 1..k, same amount, compartment and duration); SS=1 with II > 0 is kept
    as one steady-state row (ss = 1, ii = II), followed by its ADDL doses if any. Refused, with a message naming
    file, row and column: RATE=-1 (modelled rate), RATE=-2 without a positive DUR, DUR on a record without RATE=-2,
    SS=2/3, SS=1 with II=0 (steady state of a constant infusion), SS on EVID=4, ADDL > 0 without II > 0, II > 0
    without ADDL or SS, negative ADDL/II/CMT, dose items (AMT, RATE, SS, II, ADDL) on observation, other-type and
    reset records, additional doses or infusions running into a later reset (EVID=3/4 or SS=1), time decreasing
    within an individual (NONMEM allows it after a reset; not this reader).

    Censoring (Beal's M3): a CENS column (0 observed; 1 below the lower limit of quantification, DV holds the limit,
    as in Monolix and NONMEM M3 data sets; -1, above an upper limit, is refused) or an LLOQ column (a row whose DV is
    below its LLOQ, or whose DV is empty, is censored at the LLOQ). With both, CENS decides and LLOQ must agree.
    A Monolix LIMIT column (the other bound of a censoring interval) is refused unless ignored (``limit=""``).

    Comment records are skipped as NM-TRAN's IGNORE does: rows whose first character is '#' (NM-TRAN's default) or
    '@', and rows whose column ``C`` holds ``C``.

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

    cov_lower = {x.lower() for x in covariates}
    str_cols = [cmap.id] + ([group] if group else []) + categorical + ([] if "c" in cov_lower else ["C"])
    df, lines, comment_lines = _read_frame(path, str_cols)
    cols = list(df.columns)

    c_id = _resolve(path, cols, cmap.id, "individual id")
    c_time = _resolve(path, cols, cmap.time, "time")
    c_dv = _resolve(path, cols, cmap.dv, "dependent variable")
    c_amt = _optional(path, cols, cmap.amt, "AMT", "dose amount")
    c_evid = _optional(path, cols, cmap.evid, "EVID", "event id")
    c_mdv = _optional(path, cols, cmap.mdv, "MDV", "missing dependent variable flag")
    c_cmt = _optional(path, cols, cmap.cmt, "CMT", "compartment")
    c_rate = _optional(path, cols, cmap.rate, "RATE", "infusion rate")
    c_dur = _optional(path, cols, cmap.dur, "DUR", "infusion duration")
    c_ss = _optional(path, cols, cmap.ss, "SS", "steady-state flag")
    c_ii = _optional(path, cols, cmap.ii, "II", "interdose interval")
    c_addl = _optional(path, cols, cmap.addl, "ADDL", "number of additional doses")
    c_cens = _optional(path, cols, cmap.cens, "CENS", "censoring flag")
    c_lloq = _optional(path, cols, cmap.lloq, "LLOQ", "lower limit of quantification")
    c_limit = _optional(path, cols, cmap.limit, "LIMIT", "Monolix censoring-interval bound")
    c_otype = _resolve(path, cols, cmap.obs_type, "observation type") if cmap.obs_type else None
    c_group = _resolve(path, cols, group, "group") if group else None
    c_dose = _resolve(path, cols, dose_column, "dose per individual") if dose_column else None
    c_scale = _resolve(path, cols, dose_scale_column, "dose multiplier") if dose_scale_column else None
    c_covs = [_resolve(path, cols, c, "covariate") for c in covariates]
    cat_lower = {c.lower() for c in categorical}
    if len(set(c_covs)) != len(c_covs):
        raise DataError(f"{path}, row 1 (header): covariate listed twice: {covariates}")
    used = {c for c in (c_id, c_time, c_dv, c_amt, c_evid, c_mdv, c_cmt, c_rate, c_dur, c_ss, c_ii, c_addl, c_cens,
                        c_lloq, c_limit, c_otype, c_group, c_dose, c_scale, *c_covs) if c}
    notes: list[str] = []

    def note(msg: str, level: int = logging.WARNING) -> None:
        logger.log(level, "%s: %s", path, msg)
        notes.append(msg)

    # --- comment records: '#'/'@' lines (dropped while reading) and C='C' rows (NM-TRAN IGNORE) --------------
    comment_rows = np.asarray(comment_lines, dtype=np.int64)
    c_comment = next((c for c in cols if c.lower() == "c" and c not in used), None)
    if c_comment is not None:
        is_c = _Reader(path, df, lines).strings(c_comment) == "C"
        if is_c.any():
            comment_rows = np.sort(np.r_[comment_rows, lines[is_c]])
            df = df.loc[~is_c].reset_index(drop=True)
            lines = lines[~is_c]
            if len(df) == 0:
                raise DataError(f"{path}, column {c_comment}: every data row is a comment record (C='C'); expected "
                                "at least one record")
    if comment_rows.size:
        note(f"skipped {comment_rows.size} comment record(s) (first field starting with '#' or '@', or column C "
             f"= 'C', as NM-TRAN's IGNORE), e.g. {_rows(comment_rows)}", logging.INFO)
    rd = _Reader(path, df, lines)
    n = len(df)

    def num(column: str | None, expected: str) -> np.ndarray:
        return rd.numeric(column, expected) if column else np.full(n, np.nan)

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
    amt = num(c_amt, "a number (dose amount)")
    bad = np.flatnonzero(amt < 0)
    if bad.size:
        raise rd.error(lines[bad], c_amt, f"expected a dose amount >= 0, got {_fmt(amt[bad[0]])}")
    rate = num(c_rate, "a number (infusion rate; -2: duration from DUR)")
    dur = num(c_dur, "a number (infusion duration)")
    ss = num(c_ss, "a steady-state flag 0 or 1")
    ii = num(c_ii, "a number (interdose interval)")
    addl = num(c_addl, "a whole number (additional doses)")
    cmt_vals = num(c_cmt, "a compartment number")
    # NM-TRAN reads an empty cell or '.' as 0
    amt0, rate0, ss0, ii0, addl0 = (np.nan_to_num(x) for x in (amt, rate, ss, ii, addl))
    if c_cmt:
        bad = np.flatnonzero(cmt_vals < 0)
        if bad.size:
            raise rd.error(lines[bad], c_cmt,
                           f"CMT={_fmt(cmt_vals[bad[0]])}: a negative compartment (NONMEM: turn the compartment "
                           "off) is not supported; expected a compartment number >= 0 (0 or empty: the model's "
                           "default)")
        bad = np.flatnonzero(~np.isnan(cmt_vals) & ~_is_whole(cmt_vals))
        if bad.size:
            raise rd.error(lines[bad], c_cmt, f"expected a whole compartment number, got {_fmt(cmt_vals[bad[0]])}")
    if c_ss:
        bad = np.flatnonzero((ss0 != 0) & (ss0 != 1))
        if bad.size:
            v = float(ss0[bad[0]])
            what = {2.0: "SS=2 (a steady-state dose added to the amounts left by earlier doses, without reset)",
                    3.0: "SS=3 (steady state computed from the current amounts)"}.get(v)
            raise rd.error(lines[bad], c_ss,
                           (f"{what} is not supported; " if what else "") +
                           f"expected SS 0 (no steady state) or 1 (steady-state dose: the system is reset to the "
                           f"steady state of doses every II), got {_fmt(v)}")
        bad = np.flatnonzero((ss0 == 1) & (ii0 == 0))
        if bad.size:
            raise rd.error(lines[bad], c_ss,
                           "SS=1 with II=0 (or no II) is the steady state of a constant-rate infusion (NONMEM: "
                           "AMT=0, RATE > 0); not supported: steady state is supported for repeated doses, SS=1 "
                           "with II > 0 on a dose record")
    if c_mdv:
        mdv_raw = rd.numeric(c_mdv, "0 or 1")
        bad = np.flatnonzero(~np.isnan(mdv_raw) & (mdv_raw != 0) & (mdv_raw != 1))
        if bad.size:
            raise rd.error(lines[bad], c_mdv, f"expected 0 or 1, got {_fmt(mdv_raw[bad[0]])}")
        mdv = mdv_raw == 1
    else:
        mdv_raw = np.full(n, np.nan)
        mdv = np.zeros(n, dtype=bool)
    dose_items = [(c, v) for c, v in ((c_amt, amt0), (c_rate, rate0), (c_ss, ss0), (c_ii, ii0), (c_addl, addl0))
                  if c]

    # --- event type of each record (as NM-TRAN) -----------------------------------------------------------
    if c_evid:
        evid = rd.numeric(c_evid, "an event id 0-4")
        bad = np.flatnonzero(np.isnan(evid) | ~np.isin(evid, [0, 1, 2, 3, 4]))
        if bad.size:
            raise rd.error(lines[bad], c_evid,
                           f"expected an event id 0 (observation), 1 (dose), 2 (other), 3 (reset) or 4 "
                           f"(reset and dose), got {_fmt(evid[bad[0]])}")
        is_dose = np.isin(evid, [1, 4])
        is_reset = np.isin(evid, [3, 4])
        other = evid == 2
        if c_ss:
            bad = np.flatnonzero((evid == 4) & (ss0 != 0))
            if bad.size:
                raise rd.error(lines[bad], c_ss,
                               "SS=1 on an EVID=4 (reset and dose) record is not supported; a steady-state dose "
                               "resets the system itself: use EVID=1 with SS=1")
        kinds = {0: "an observation", 2: "an other-type event", 3: "a reset"}
        for c, v in dose_items:
            bad = np.flatnonzero(~is_dose & (v != 0))
            if bad.size:
                e = int(evid[bad[0]])
                raise rd.error(lines[bad], c,
                               f"EVID={e} marks {kinds[e]}; expected {c} empty or 0 there (NONMEM requires the "
                               f"dose items AMT, RATE, SS, II, ADDL to be 0 on EVID={e} records), got "
                               f"{_fmt(v[bad[0]])}")
        bad = np.flatnonzero(is_dose & ~(amt0 > 0))
        if bad.size:
            raise rd.error(lines[bad], c_amt or "AMT",
                           f"EVID={int(evid[bad[0]])} marks a dose record; expected an amount > 0, "
                           f"got {_fmt(amt[bad[0]])}")
        bad = np.flatnonzero((evid != 0) & (mdv_raw == 0))
        if bad.size:
            raise rd.error(lines[bad], c_mdv,
                           f"MDV=0 on an EVID={int(evid[bad[0]])} record; NONMEM requires MDV=1 on dose, "
                           "other-type and reset records (EVID 1-4); expected MDV=1 or empty (put an observation "
                           "at the same time on its own EVID=0 record)")
    else:
        is_dose = amt0 > 0
        is_reset = np.zeros(n, dtype=bool)
        other = np.zeros(n, dtype=bool)
        for c, v in dose_items[1:] if c_amt else dose_items:
            bad = np.flatnonzero(~is_dose & (v != 0))
            if bad.size:
                raise rd.error(lines[bad], c,
                               f"{c}={_fmt(v[bad[0]])} on a record without a dose amount (AMT "
                               f"{_fmt(amt[bad[0]]) if c_amt else 'column missing'}); without an EVID column "
                               f"NM-TRAN reads a record as a dose when AMT > 0; expected {c} empty or 0 on "
                               "observation records, or AMT > 0")
        bad = np.flatnonzero(is_dose & (mdv_raw == 0))
        if bad.size:
            r = bad[0]
            raise rd.error(lines[bad], c_amt,
                           f"AMT={_fmt(amt[r])} makes this a dose record (NM-TRAN: AMT > 0), but MDV=0 marks an "
                           f"observation (DV={_fmt(dv[r])}); NONMEM requires MDV=1 on dose records; expected a dose "
                           "record with MDV=1 (a dose and an observation at the same time go on two records) or "
                           "AMT empty/0 on observation rows")
    skipped = ~is_dose & ~is_reset & (other | mdv)
    is_obs = ~is_dose & ~is_reset & ~skipped
    if c_dose is not None and (is_dose | is_reset).any():
        raise rd.error(lines[np.flatnonzero(is_dose | is_reset)], c_amt or c_evid,
                       f"dose records found although doses are taken from column {c_dose}; expected one or "
                       "the other")

    # --- dose records: infusions, additional doses, steady state -------------------------------------------
    d = is_dose
    if c_rate:
        bad = np.flatnonzero(d & (rate0 == -1))
        if bad.size:
            raise rd.error(lines[bad], c_rate,
                           "RATE=-1 (infusion rate modelled in the control stream, R1) is not supported; expected "
                           "RATE 0 or empty (bolus), > 0 (infusion of AMT at RATE, duration AMT/RATE) or -2 "
                           "(duration from the DUR column)")
        bad = np.flatnonzero(d & (rate0 < 0) & (rate0 != -2))
        if bad.size:
            raise rd.error(lines[bad], c_rate,
                           f"expected RATE 0 or empty (bolus), > 0 (infusion rate) or -2 (duration from the DUR "
                           f"column), got {_fmt(rate0[bad[0]])}")
        bad = np.flatnonzero(d & (rate0 == -2))
        if bad.size and not c_dur:
            raise rd.error(lines[bad], c_rate,
                           "RATE=-2 (modelled duration; NONMEM takes it from D1 in $PK) needs the duration in a "
                           "DUR column here (as a control stream with D1 = DUR), but the file has no DUR column; "
                           "expected a DUR column, or RATE 0 / > 0")
        bad = np.flatnonzero(d & (rate0 == -2) & ~(dur > 0))
        if bad.size:
            raise rd.error(lines[bad], c_dur,
                           f"expected an infusion duration > 0 with RATE=-2, got {_fmt(dur[bad[0]])}")
    if c_dur:
        bad = np.flatnonzero(d & (dur < 0))
        if bad.size:
            raise rd.error(lines[bad], c_dur, f"expected an infusion duration >= 0, got {_fmt(dur[bad[0]])}")
        bad = np.flatnonzero(d & (np.nan_to_num(dur) != 0) & (rate0 != -2))
        if bad.size:
            r = bad[0]
            raise rd.error(lines[bad], c_dur,
                           f"DUR={_fmt(dur[r])} on a dose record with RATE="
                           f"{_fmt(rate0[r]) if c_rate else 'missing (no RATE column)'}; the reader takes an "
                           "infusion's duration from DUR only with RATE=-2 (NM-TRAN itself ignores DUR, a control "
                           "stream uses it through D1 = DUR); expected RATE=-2 or DUR empty/0")
    if c_addl:
        bad = np.flatnonzero(d & (addl0 < 0))
        if bad.size:
            raise rd.error(lines[bad], c_addl,
                           f"ADDL={_fmt(addl0[bad[0]])}: a negative ADDL (NONMEM 7.5's empirical steady state) is "
                           "not supported; expected a whole number of additional doses >= 0")
        bad = np.flatnonzero(d & ~_is_whole(addl0))
        if bad.size:
            raise rd.error(lines[bad], c_addl,
                           f"expected a whole number of additional doses, got {_fmt(addl0[bad[0]])}")
    if c_ii:
        bad = np.flatnonzero(d & (ii0 < 0))
        if bad.size:
            raise rd.error(lines[bad], c_ii, f"expected an interdose interval II >= 0, got {_fmt(ii0[bad[0]])}")
    bad = np.flatnonzero(d & (addl0 > 0) & ~(ii0 > 0))
    if bad.size:
        r = bad[0]
        raise rd.error(lines[bad], c_ii or c_addl,
                       f"ADDL={_fmt(addl0[r])} additional doses need an interdose interval II > 0, got "
                       f"{_fmt(ii[r]) if c_ii else 'no II column'}")
    bad = np.flatnonzero(d & (ii0 > 0) & (addl0 == 0) & (ss0 == 0))
    if bad.size:
        raise rd.error(lines[bad], c_ii,
                       f"II={_fmt(ii0[bad[0]])} on a dose record without ADDL or SS; NONMEM uses II only for "
                       "additional doses (ADDL > 0, which it requires exactly when II > 0 on a non-steady-state "
                       "dose) or a steady-state dose (SS=1); expected II empty or 0, or ADDL/SS set")
    duration = np.zeros(n)
    infusion = d & (rate0 > 0)
    duration[infusion] = amt0[infusion] / rate0[infusion]
    modelled = d & (rate0 == -2)
    duration[modelled] = dur[modelled]
    nonzero_dv = (d | is_reset) & ~np.isnan(dv) & (dv != 0)
    if nonzero_dv.any():
        note(f"ignored the DV value of {int(nonzero_dv.sum())} dose/reset record(s), as NONMEM does (MDV=1 there), "
             f"e.g. {_rows(lines[nonzero_dv])}")

    # --- censoring (below the lower limit of quantification; Beal's M3) -------------------------------------
    censored = np.zeros(n, dtype=bool)
    limit = np.full(n, np.nan)
    lloq_v = num(c_lloq, "a number (lower limit of quantification) or an empty cell")
    if c_cens:
        cens = rd.numeric(c_cens, "a censoring flag 0, 1 or -1")
        cens0 = np.nan_to_num(cens)
        bad = np.flatnonzero(~np.isin(cens0, [0, 1, -1]))
        if bad.size:
            raise rd.error(lines[bad], c_cens,
                           f"expected CENS 0 (observed) or 1 (below the lower limit of quantification, DV = LLOQ), "
                           f"got {_fmt(cens0[bad[0]])}")
        bad = np.flatnonzero(is_obs & (cens0 == -1))
        if bad.size:
            raise rd.error(lines[bad], c_cens,
                           "CENS=-1 (above an upper limit of quantification, right-censored) is not supported; "
                           "supported: CENS=0 (observed) and CENS=1 (below the lower limit, DV holds the limit; "
                           "Beal's M3)")
        bad = np.flatnonzero((d | is_reset) & (cens0 != 0))
        if bad.size:
            raise rd.error(lines[bad], c_cens,
                           f"CENS={_fmt(cens0[bad[0]])} on a dose/reset record; expected CENS 0 or empty there")
        censored = is_obs & (cens0 == 1)
        limit = np.where(censored, dv, np.nan)
        if c_lloq:
            both = censored & ~np.isnan(dv) & ~np.isnan(lloq_v) & (dv != lloq_v)
            bad = np.flatnonzero(both)
            if bad.size:
                r = bad[0]
                raise rd.error(lines[bad], c_lloq,
                               f"CENS=1 means DV holds the limit of quantification (DV={_fmt(dv[r])}), but "
                               f"LLOQ={_fmt(lloq_v[r])}; expected equal values (or DV empty)")
            fill = censored & np.isnan(dv)
            limit[fill] = lloq_v[fill]
            bad = np.flatnonzero(is_obs & (cens0 == 0) & (dv < lloq_v))
            if bad.size:
                r = bad[0]
                raise rd.error(lines[bad], c_cens,
                               f"CENS=0 marks a quantified observation, but DV={_fmt(dv[r])} is below "
                               f"LLOQ={_fmt(lloq_v[r])}; expected CENS=1 or DV >= LLOQ (or ignore the LLOQ column "
                               "with columns={'lloq': ''})")
        bad = np.flatnonzero(censored & np.isnan(limit))
        if bad.size:
            raise rd.error(lines[bad], c_dv,
                           "CENS=1 means DV holds the lower limit of quantification; expected a number, got an "
                           "empty cell" + ("" if c_lloq else " (and there is no LLOQ column)"))
        n_m1 = int(np.count_nonzero(skipped & (cens0 == 1)))
        if n_m1:
            note(f"{n_m1} record(s) flagged CENS=1 have MDV=1 or EVID=2 and were skipped, as NONMEM skips them "
                 "(discarded BLQ data, Beal's M1); give them MDV=0 to use them as censored observations (M3)")
    elif c_lloq:
        censored = is_obs & ~np.isnan(lloq_v) & (np.isnan(dv) | (dv < lloq_v))
        limit = np.where(censored, lloq_v, np.nan)
    if c_limit:
        lim = rd.numeric(c_limit, "a number (censoring-interval bound) or an empty cell")
        if c_cens:
            bad = np.flatnonzero(censored & ~np.isnan(lim))
            if bad.size:
                raise rd.error(lines[bad], c_limit,
                               f"LIMIT={_fmt(lim[bad[0]])} with CENS=1: Monolix reads this as interval censoring "
                               "(the value lies between LIMIT and DV); only left-censoring below the LLOQ (Beal's "
                               "M3, interval (-inf, LLOQ]) is supported; to read these rows as M3, ignore the "
                               "LIMIT column (columns={'limit': ''})")
        else:
            bad = np.flatnonzero(is_obs & ~np.isnan(lim))
            if bad.size:
                raise rd.error(lines[bad], c_limit,
                               "a LIMIT column without CENS: Monolix reads LIMIT only with CENS, as the other bound "
                               "of a censoring interval; if it gives the lower limit of quantification map it as "
                               "LLOQ (columns={'lloq': '" + c_limit + "'}), otherwise ignore it "
                               "(columns={'limit': ''})")
    for c in cols:
        flagged = c.lower() in _BLQ_FLAG_NAMES and c not in used
        if flagged and (pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64)[is_obs] > 0).any():
            note(f"column {c} is not read: NM-TRAN does not interpret it either (the control stream does); if it "
                 f"flags observations below the limit of quantification whose DV holds the limit, map it as the "
                 f"censoring flag (columns={{'cens': '{c}'}}) or give the limits in an LLOQ column")
        if c.lower() in _DATE_NAMES and c not in used:
            note(f"column {c} is not read: the reader takes TIME as elapsed time, whereas NM-TRAN combines a DATE "
                 "item with TIME (day-time translation) when the control stream's $INPUT labels it so; if TIME is a "
                 "clock time, give elapsed times instead")
    bad = np.flatnonzero(is_obs & ~censored & np.isnan(dv))
    if bad.size:
        raise rd.error(lines[bad], c_dv,
                       "expected a numeric observation, got an empty/NaN value on an observation row "
                       "(mark records without observation with MDV=1 or EVID=2"
                       + (", or censored ones with CENS=1 / an LLOQ" if not (c_cens or c_lloq) else "") + ")")

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
        extra = (f"; NONMEM lets time restart at a reset record (EVID={int(evid[r])}), this reader does not: give "
                 "times since the individual's first record" if c_evid and is_reset[r] else "")
        raise rd.error(lines[r], c_time,
                       f"time decreases within ID {ids[r]!r} ({_fmt(time[r - 1])} in row {lines[r - 1]}, then "
                       f"{_fmt(time[r])}); expected the rows of each individual sorted by time{extra}")

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
    dose_row_lists: list[np.ndarray]
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
        dose_lists = [np.array([[float(dose_time), float(a), float(dose_cmt), 0.0, 0.0, 0.0, 0.0]])
                      for a in per_dose]
        dose_row_lists = [np.array([lines[s]], dtype=np.int64) for s in starts]
        first_dose = np.full(n_ind, float(dose_time))
        implied_keys = None
    else:
        if c_scale is not None:
            raise DataError(f"{path}: dose_scale_column={dose_scale_column!r} needs dose_column")
        _check_resets(rd, lines, codes, time, is_dose, is_reset, ss0, addl0, ii0, duration, c_evid and evid,
                      c_addl, c_rate or c_dur)
        rec = np.flatnonzero(is_dose | is_reset)
        r_dose = is_dose[rec]
        r_amt = np.where(r_dose, amt0[rec], 0.0)
        r_cmt = np.where(r_dose, np.nan_to_num(cmt_vals[rec]), 0.0)
        r_dur = np.where(r_dose, duration[rec], 0.0)
        r_ss = np.where(r_dose, ss0[rec], 0.0)
        r_ii = np.where(r_ss == 1, ii0[rec], 0.0)
        base = np.column_stack([time[rec], r_amt, r_cmt, r_dur, r_ss, r_ii, is_reset[rec].astype(np.float64)])
        k_addl = np.where(r_dose, addl0[rec], 0.0).astype(np.int64)
        total = int(k_addl.sum())
        if total > _MAX_ADDL_DOSES:
            worst = int(np.argmax(k_addl))
            raise rd.error(lines[rec[worst]], c_addl,
                           f"ADDL adds {total} doses in all (ADDL={k_addl[worst]} here); expected at most "
                           f"{_MAX_ADDL_DOSES} additional doses per file")
        parent = np.repeat(np.arange(rec.size), k_addl)
        j = np.arange(total) - np.repeat(np.cumsum(k_addl) - k_addl, k_addl) + 1
        zeros = np.zeros(total)
        extra = np.column_stack([time[rec][parent] + j * ii0[rec][parent], r_amt[parent], r_cmt[parent],
                                 r_dur[parent], zeros, zeros, zeros])
        all_d = np.vstack([base, extra]) if total else base
        all_code = np.r_[codes[rec], codes[rec][parent]]
        all_row = np.r_[lines[rec], lines[rec][parent]].astype(np.int64)
        order = np.lexsort((np.arange(all_d.shape[0]), all_d[:, 0], all_code))
        all_d, all_code, all_row = all_d[order], all_code[order], all_row[order]
        d_split = np.searchsorted(all_code, np.arange(1, n_ind))
        dose_lists = [a.copy() for a in np.split(all_d, d_split)]
        dose_row_lists = [a.copy() for a in np.split(all_row, d_split)]
        first_dose = np.full(n_ind, np.inf)
        if d.any():
            np.minimum.at(first_dose, codes[d], time[d])
        implied_keys = (codes[rec][parent], extra[:, 0]) if total else None
        if total:
            note(f"expanded ADDL on {int(np.count_nonzero(k_addl))} dose record(s) into {total} additional "
                 f"dose(s)", logging.INFO)

    # --- observations at the time of a dose ------------------------------------------------------------------
    is_event = is_dose | is_reset
    if is_event.any():
        new_run = np.r_[True, (codes[1:] != codes[:-1]) | (time[1:] != time[:-1])]
        run = np.cumsum(new_run) - 1
        before = np.cumsum(is_event) - is_event  # dose/reset records earlier in the file
        after_event = is_obs & (before - before[np.flatnonzero(new_run)][run] > 0)
        if after_event.any():
            note(f"{int(after_event.sum())} observation(s) follow a dose or reset record with the same time, e.g. "
                 f"{_rows(lines[after_event])}; NONMEM applies that record before the observation, so for a bolus "
                 "into the observed compartment a model must do the same at these times")
        if implied_keys is not None:
            obs_keys = pd.MultiIndex.from_arrays([codes[is_obs], time[is_obs]])
            hit = obs_keys.isin(pd.MultiIndex.from_arrays(list(implied_keys)))
            if hit.any():
                note(f"{int(hit.sum())} observation(s) fall at the time of an additional (ADDL) dose, e.g. "
                     f"{_rows(lines[np.flatnonzero(is_obs)[hit]])}; the dose arrays do not say whether such a dose "
                     "acts before the observation")

    # --- observation records ----------------------------------------------------------------------------------
    n_skip = int(skipped.sum())
    if n_skip:
        note(f"skipped {n_skip} record(s) without observation and without dose (MDV=1 or EVID=2), "
             f"e.g. {_rows(lines[np.flatnonzero(skipped)])}")
    if drop_predose:
        pre = is_obs & (time <= first_dose[codes])
        n_pre = int(pre.sum())
        if n_pre:
            note(f"dropped {n_pre} pre-dose observation(s) (time <= first dose time), as requested", logging.INFO)
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
            num_t = cmt_vals[obs_rows]
            missing = np.isnan(num_t)
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
                values, codes_t = np.unique(num_t, return_inverse=True)
                found = [f"{x:g}" for x in values]
            order_t = sorted(range(len(found)), key=lambda jj: _sort_key(found[jj]))
            remap = np.empty(len(order_t), dtype=np.int64)
            remap[order_t] = np.arange(len(order_t))
            otype = remap[codes_t.reshape(-1)]
            labels = [found[jj] for jj in order_t]
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
    cens_obs = censored[obs_rows]
    t_obs = time[obs_rows]
    y_obs = np.where(cens_obs, limit[obs_rows], dv[obs_rows])
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
        censored=[a.copy() for a in np.split(cens_obs, split)],
        lloq=[a.copy() for a in np.split(np.where(cens_obs, limit[obs_rows], np.nan), split)],
        dose_rows=dose_row_lists,
    )
    logger.info("%s: read %d individuals, %d observations (%d censored)", path, data.n_individuals,
                data.n_observations, data.n_censored)
    return data


def _check_resets(rd: _Reader, lines: np.ndarray, codes: np.ndarray, time: np.ndarray, is_dose: np.ndarray,
                  is_reset: np.ndarray, ss0: np.ndarray, addl0: np.ndarray, ii0: np.ndarray, duration: np.ndarray,
                  evid: np.ndarray | None | str, c_addl: str | None, c_inf: str | None) -> None:
    """Refuse additional doses or infusions that run into a later reset (EVID=3/4, or an SS=1 dose, which resets
    the system): how a reset interrupts a dosing schedule is left out, rather than guessed."""
    points = np.flatnonzero(is_reset | (is_dose & (ss0 == 1)))
    dose_rows = np.flatnonzero(is_dose & ((addl0 > 0) | (duration > 0)))
    if not points.size or not dose_rows.size:
        return
    nxt = np.searchsorted(points, dose_rows, side="right")
    has = nxt < points.size
    p, q = dose_rows[has], points[nxt[has]]
    same = codes[p] == codes[q]
    p, q = p[same], q[same]
    last = time[p] + addl0[p] * ii0[p]
    by_addl = (addl0[p] > 0) & (last >= time[q])
    by_infusion = (duration[p] > 0) & (last + duration[p] > time[q])
    bad = np.flatnonzero(by_addl | by_infusion)
    if not bad.size:
        return
    b = bad[0]
    pp, qq = p[b], q[b]
    if isinstance(evid, np.ndarray) and is_reset[qq]:
        why = f"EVID={int(evid[qq])}"
    else:
        why = "an SS=1 steady-state dose, which resets the system"
    where = f"the reset in row {lines[qq]} (time {_fmt(time[qq])}, {why})"
    if by_addl[b]:
        raise rd.error(lines[p[bad]], c_addl,
                       f"the additional doses of this record (ADDL={_fmt(addl0[pp])}, II={_fmt(ii0[pp])}) run until "
                       f"time {_fmt(last[b])}, up to or past {where}; a dosing schedule interrupted by a reset is "
                       "not supported; expected the additional doses to end before the reset (lower ADDL)")
    raise rd.error(lines[p[bad]], c_inf,
                   f"this infusion (duration {_fmt(duration[pp])}) runs until time {_fmt(last[b] + duration[pp])}, "
                   f"past {where}; an infusion interrupted by a reset is not supported; expected the infusion to "
                   f"end by time {_fmt(time[qq])}")


def _sort_key(label: Any) -> tuple[int, float, str]:
    """Numeric labels in numeric order, then text labels alphabetically."""
    try:
        return (0, float(label), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(label))
