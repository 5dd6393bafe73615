"""Data drift: recent inputs against the training statistics kept in the manifest.

Each replica keeps a bounded window of its most recent rows per model version and turns
it into a `WindowCounts`: per feature, the row count in each training bin (for PSI) and
how many rows fall below / at-or-below each point of the training sample (for KS). Those
counts are additive, so the monitor hub sums the replicas' counts and computes the
scores of the union of their windows exactly, as if one window had seen every row.

PSI = sum((a - e) * ln(a / e)) over the training deciles (outer bins open-ended);
KS = the two-sample Kolmogorov-Smirnov statistic sup|F_window - F_train|, evaluated at
the training sample points, where the supremum of two step functions is reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence, Union

import numpy as np

from serve_app.model.manifest import Manifest
from serve_app.model.schema import CategoryStats, category_key
from serve_app.protocol.columns import ColumnTable

# What the ledger hands the monitor as a prediction's inputs: the float64 matrix of an
# all-numeric model, or the validated columns of a model with typed columns.
Inputs = Union[np.ndarray, ColumnTable]

Status = Literal["ok", "warning", "drift", "insufficient_data"]
_SEVERITY = {"ok": 0, "warning": 1, "drift": 2}
# A bin nobody fell into would make PSI infinite; this floor is the usual convention.
PSI_EPSILON = 1e-4


@dataclass(frozen=True)
class Thresholds:
    """Where drift starts. The values and their defaults live in one place, the monitoring
    settings (settings.py `MonitoringSettings`); `from_settings` reads them."""

    psi_warning: float
    psi_drift: float
    ks_warning: float
    ks_drift: float
    min_rows: int

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "Thresholds":
        """From `MonitoringSettings.model_dump()` (what the hub is configured with)."""
        return cls(
            psi_warning=settings["psi_warning"], psi_drift=settings["psi_drift"],
            ks_warning=settings["ks_warning"], ks_drift=settings["ks_drift"], min_rows=settings["drift_min_rows"],
        )


@dataclass(frozen=True)
class FeatureReference:
    inner_edges: np.ndarray  # the training bin edges without the outermost two
    fractions: np.ndarray  # training fraction of rows per bin
    sample: np.ndarray  # sorted training sample
    cdf_lt: np.ndarray  # F_train just below each sample point
    cdf_le: np.ndarray  # F_train at each sample point


@dataclass(frozen=True)
class DriftReference:
    """What one model version's inputs are compared with (from its manifest).

    `features` are the numeric columns (every feature of an all-numeric model), `categories`
    the string and boolean ones of a typed model; `columns` is both in schema order, the
    order drift is reported in. A window row holds the numeric values, then the categories'
    bin indices (NaN for a null)."""

    model: str
    version: str
    features: tuple[str, ...]
    per_feature: tuple[FeatureReference, ...]
    categories: tuple[str, ...] = ()
    per_category: tuple["CategoryReference", ...] = ()
    typed: bool = False  # requests come as a ColumnTable (not the float64 matrix)
    columns: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """Values per window row."""
        return len(self.features) + len(self.categories)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "DriftReference | None":
        if manifest.typed:
            return cls._typed(manifest)
        if not manifest.training_stats or any(f not in manifest.training_stats for f in manifest.feature_names):
            return None  # a model stored without reference data: nothing to compare with
        refs = [_feature_reference(manifest, name) for name in manifest.feature_names]
        names = tuple(manifest.feature_names)
        return cls(manifest.name, manifest.version, names, tuple(refs), columns=names)

    @classmethod
    def _typed(cls, manifest: Manifest) -> "DriftReference | None":
        # A column without statistics (a numeric one that was all null in the sample) is not
        # monitored; the others still are.
        features, categories, columns = [], [], []
        for column in manifest.schema.columns:
            if column.kind in ("number", "integer") and column.name in manifest.training_stats:
                features.append(column.name)
            elif column.kind in ("string", "boolean") and column.name in manifest.category_stats:
                categories.append(column.name)
            else:
                continue
            columns.append(column.name)
        if not columns:
            return None
        return cls(
            manifest.name, manifest.version,
            tuple(features), tuple(_feature_reference(manifest, name) for name in features),
            tuple(categories), tuple(CategoryReference.from_stats(manifest.category_stats[name]) for name in categories),
            typed=True, columns=tuple(columns),
        )

    def window_rows(self, inputs: Inputs) -> np.ndarray:
        """`inputs` as rows of this reference's window: the matrix itself for an all-numeric
        model; for a ColumnTable the numeric columns as float64 (NaN for null), then each
        categorical column's bin indices."""
        if not isinstance(inputs, ColumnTable):
            if self.categories or len(self.features) != inputs.shape[1]:
                raise TypeError(f"{self.model} v{self.version} has typed columns: its inputs must be a ColumnTable")
            return inputs
        rows = np.empty((inputs.n_rows, self.width), dtype=np.float64)
        for i, name in enumerate(self.features):
            rows[:, i] = _as_float(inputs.columns[name])
        for j, (name, ref) in enumerate(zip(self.categories, self.per_category)):
            rows[:, len(self.features) + j] = ref.codes(inputs.columns[name])
        return rows


def _feature_reference(manifest: Manifest, name: str) -> FeatureReference:
    stats = manifest.training_stats[name]
    sample = np.asarray(stats.sample, dtype=np.float64)
    n = len(sample)
    return FeatureReference(
        inner_edges=np.asarray(stats.bin_edges[1:-1], dtype=np.float64),
        fractions=np.asarray(stats.bin_fractions, dtype=np.float64),
        sample=sample,
        cdf_lt=np.searchsorted(sample, sample, side="left") / n,
        cdf_le=np.searchsorted(sample, sample, side="right") / n,
    )


def _as_float(values: np.ndarray) -> np.ndarray:
    """A number or integer column as float64, NaN for null (nullable integers are objects)."""
    if values.dtype != object:
        return values.astype(np.float64, copy=False)
    missing = np.fromiter((v is None for v in values.tolist()), dtype=bool, count=len(values))
    out = np.full(len(values), np.nan)
    out[~missing] = values[~missing].astype(np.float64)
    return out


@dataclass
class WindowCounts:
    """Additive summary of a window of rows (one replica's, or the sum of several)."""

    rows: int
    bins: list[np.ndarray]  # per feature: non-null rows per training bin
    lt: list[np.ndarray]  # per feature: rows strictly below each sample point
    le: list[np.ndarray]  # per feature: rows at or below each sample point
    nulls: list[int] = field(default_factory=list)  # per feature: null rows (typed models)
    categories: list["CategoryCounts"] = field(default_factory=list)  # per categorical column

    @classmethod
    def of(cls, reference: DriftReference, window: np.ndarray) -> "WindowCounts":
        bins, lt, le, nulls = [], [], [], []
        n_features = len(reference.per_feature)
        for column, ref in zip(window.T[:n_features], reference.per_feature):
            missing = np.isnan(column)
            null_count = int(missing.sum())
            if null_count:
                column = column[~missing]
            ordered = np.sort(column)
            bins.append(np.bincount(np.searchsorted(ref.inner_edges, column, side="right"), minlength=len(ref.fractions)))
            lt.append(np.searchsorted(ordered, ref.sample, side="left"))
            le.append(np.searchsorted(ordered, ref.sample, side="right"))
            nulls.append(null_count)
        categories = []
        for codes, cat in zip(window.T[n_features:], reference.per_category):
            missing = np.isnan(codes)
            counts = np.bincount(codes[~missing].astype(np.intp), minlength=len(cat.bins))
            categories.append(CategoryCounts(len(codes), int(missing.sum()), counts))
        return cls(len(window), bins, lt, le, nulls, categories)

    def feature_nulls(self, i: int) -> int:
        return self.nulls[i] if i < len(self.nulls) else 0

    def __add__(self, other: "WindowCounts") -> "WindowCounts":
        return WindowCounts(
            self.rows + other.rows,
            [a + b for a, b in zip(self.bins, other.bins)],
            [a + b for a, b in zip(self.lt, other.lt)],
            [a + b for a, b in zip(self.le, other.le)],
            [self.feature_nulls(i) + other.feature_nulls(i) for i in range(len(self.bins))],
            [a + b for a, b in zip(self.categories, other.categories)],
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "bins": self.bins, "lt": self.lt, "le": self.le,
            "nulls": self.nulls, "categories": [c.to_wire() for c in self.categories],
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> "WindowCounts":
        return cls(
            int(data["rows"]), list(data["bins"]), list(data["lt"]), list(data["le"]),
            [int(n) for n in data.get("nulls", ())],
            [CategoryCounts.from_wire(c) for c in data.get("categories", ())],
        )


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.clip(expected, PSI_EPSILON, None)
    a = np.clip(actual, PSI_EPSILON, None)
    return float(np.sum((a - e) * np.log(a / e)))


def feature_status(psi_value: float, ks_value: float, rows: int, thresholds: Thresholds) -> Status:
    if rows < thresholds.min_rows:
        return "insufficient_data"
    if psi_value >= thresholds.psi_drift or ks_value >= thresholds.ks_drift:
        return "drift"
    if psi_value >= thresholds.psi_warning or ks_value >= thresholds.ks_warning:
        return "warning"
    return "ok"


def worst(statuses: Sequence[Status]) -> Status:
    judged = [s for s in statuses if s in _SEVERITY]
    if not judged:
        return "insufficient_data"
    return max(judged, key=_SEVERITY.__getitem__)


def score(reference: DriftReference, counts: WindowCounts, thresholds: Thresholds) -> dict[str, Any]:
    """PSI, KS and a status per feature for the rows summarised by `counts`; for a typed
    model, per column in schema order, categorical ones scored by `score_category`."""
    results: dict[str, Any] = {}
    for i, (name, ref, bins, lt, le) in enumerate(zip(reference.features, reference.per_feature, counts.bins, counts.lt, counts.le)):
        nulls = counts.feature_nulls(i)
        present = counts.rows - nulls
        if present == 0:
            psi_value = ks_value = 0.0
        else:
            psi_value = psi(ref.fractions, np.asarray(bins) / present)
            ks_value = float(
                max(
                    np.max(np.abs(np.asarray(lt) / present - ref.cdf_lt)),
                    np.max(np.abs(np.asarray(le) / present - ref.cdf_le)),
                )
            )
        results[name] = {
            "psi": round(psi_value, 6),
            "ks": round(ks_value, 6),
            "status": feature_status(psi_value, ks_value, present, thresholds),
        }
        if reference.typed:
            results[name]["kind"] = "numeric"
            results[name]["null_share"] = round(nulls / counts.rows, 6) if counts.rows else 0.0
    for name, cat, cat_counts in zip(reference.categories, reference.per_category, counts.categories):
        results[name] = {
            "kind": "categorical",
            **score_category(cat, cat_counts, thresholds),
            "categories": category_shares(cat, cat_counts),
        }
    features = {name: results[name] for name in reference.columns if name in results}
    return {
        "model": reference.model,
        "version": reference.version,
        "rows": counts.rows,
        "status": worst([f["status"] for f in features.values()]),
        "features": features,
    }


class RowWindow:
    """The most recent `size` rows, in a preallocated ring (no allocation per request)."""

    def __init__(self, size: int, n_features: int) -> None:
        self.buffer = np.empty((size, n_features), dtype=np.float64)
        self.size = size
        self.position = 0
        self.filled = 0

    def add(self, rows: np.ndarray) -> None:
        if len(rows) >= self.size:
            self.buffer[:] = rows[-self.size :]
            self.position, self.filled = 0, self.size
            return
        end = self.position + len(rows)
        if end <= self.size:
            self.buffer[self.position : end] = rows
        else:
            split = self.size - self.position
            self.buffer[self.position :] = rows[:split]
            self.buffer[: end - self.size] = rows[split:]
        self.position = end % self.size
        self.filled = min(self.size, self.filled + len(rows))

    def rows(self) -> np.ndarray:
        return self.buffer[: self.filled] if self.filled < self.size else self.buffer


# --- Categorical columns -----------------------------------------------------------------
#
# PSI over categories, with the numeric thresholds (`Thresholds.psi_warning`/`psi_drift`):
# the training's most frequent categories (up to MAX_CATEGORY_BINS, as many bins as the
# numeric deciles, so sampling noise is alike) each get a bin, the rarer seen ones share an
# "other" bin, and categories never seen in training fall in an "unseen" bin whose training
# fraction is 0 (floored at PSI_EPSILON like any empty bin). So unseen categories count in
# PSI: about 2% of rows unseen alone makes a warning (PSI 0.1), about 4% drift (PSI 0.25).
# Nulls are not a bin: PSI is over the non-null values, and the null share is reported beside.

MAX_CATEGORY_BINS = 10
OTHER_BIN = "(other)"
UNSEEN_BIN = "(unseen)"


@dataclass(frozen=True)
class CategoryReference:
    """A categorical column's training distribution, binned (from its `CategoryStats`)."""

    bins: tuple[str, ...]  # the named bins, then OTHER_BIN, then UNSEEN_BIN
    index: Mapping[str, int]  # every training category -> its bin
    fractions: np.ndarray  # training fraction of non-null rows per bin (unseen: 0)
    null_share: float

    @classmethod
    def from_stats(cls, stats: CategoryStats) -> "CategoryReference":
        ordered = sorted(stats.frequencies.items(), key=lambda item: (-item[1], item[0]))
        named = [name for name, _ in ordered[:MAX_CATEGORY_BINS]]
        index = {name: i for i, name in enumerate(named)}
        other = len(named)
        fractions = np.zeros(len(named) + 2)
        for name, fraction in ordered:
            bin_ = index.setdefault(name, other)
            fractions[bin_] += fraction
        return cls((*named, OTHER_BIN, UNSEEN_BIN), index, fractions, stats.null_share)

    def codes(self, values: np.ndarray) -> np.ndarray:
        """Each value's bin index as a float (NaN for a null): how a window stores the column."""
        unseen = len(self.bins) - 1
        if values.dtype == np.bool_:
            return np.where(values, float(self.index.get("true", unseen)), float(self.index.get("false", unseen)))
        index, nan = self.index, float("nan")

        def code(value: Any) -> float:
            if value is None or (isinstance(value, float) and value != value):
                return nan
            return index.get(category_key(value), unseen)

        return np.fromiter((code(v) for v in values.tolist()), dtype=np.float64, count=len(values))


@dataclass
class CategoryCounts:
    """Additive summary of a window of one categorical column's values."""

    rows: int  # values, nulls included
    nulls: int
    bins: np.ndarray  # non-null values per bin of the reference

    @classmethod
    def of(cls, reference: CategoryReference, values: Iterable[Any]) -> "CategoryCounts":
        bins = np.zeros(len(reference.bins), dtype=np.int64)
        unseen = len(reference.bins) - 1
        rows = nulls = 0
        for value in values:
            rows += 1
            if value is None or (isinstance(value, float) and value != value):
                nulls += 1
                continue
            bins[reference.index.get(category_key(value), unseen)] += 1
        return cls(rows, nulls, bins)

    def __add__(self, other: "CategoryCounts") -> "CategoryCounts":
        return CategoryCounts(self.rows + other.rows, self.nulls + other.nulls, self.bins + other.bins)

    def to_wire(self) -> dict[str, Any]:
        return {"rows": self.rows, "nulls": self.nulls, "bins": self.bins.tolist()}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> "CategoryCounts":
        return cls(int(data["rows"]), int(data["nulls"]), np.asarray(data["bins"], dtype=np.int64))


def category_psi(reference: CategoryReference, counts: CategoryCounts) -> float:
    """PSI between the training and the window's category fractions (non-null values)."""
    seen = counts.rows - counts.nulls
    if seen == 0:
        return 0.0
    return psi(reference.fractions, counts.bins / seen)


def unseen_share(counts: CategoryCounts) -> float:
    """The fraction of the window's non-null values that are categories never seen in training."""
    seen = counts.rows - counts.nulls
    return float(counts.bins[-1] / seen) if seen else 0.0


def score_category(reference: CategoryReference, counts: CategoryCounts, thresholds: Thresholds) -> dict[str, Any]:
    """PSI, unseen share, null shares and a status (by PSI, with the numeric thresholds) for
    one categorical column; `insufficient_data` below `min_rows` non-null values."""
    psi_value = category_psi(reference, counts)
    seen = counts.rows - counts.nulls
    return {
        "psi": round(psi_value, 6),
        "unseen_share": round(unseen_share(counts), 6),
        "null_share": round(counts.nulls / counts.rows, 6) if counts.rows else 0.0,
        "training_null_share": round(reference.null_share, 6),
        "status": feature_status(psi_value, 0.0, seen, thresholds),
    }


def category_shares(reference: CategoryReference, counts: CategoryCounts) -> list[dict[str, Any]]:
    """Per bin (the training's top categories, then other and unseen), its share of the
    training's and of the window's non-null values: what the dashboard draws."""
    seen = counts.rows - counts.nulls
    live = counts.bins / seen if seen else np.zeros(len(reference.bins))
    return [
        {"category": name, "training": round(float(expected), 6), "live": round(float(actual), 6)}
        for name, expected, actual in zip(reference.bins, reference.fractions, live)
    ]
