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

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from serve_app.model.manifest import Manifest
from serve_app.model.schema import CategoryStats, category_key

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
    """What one model version's inputs are compared with (from its manifest)."""

    model: str
    version: str
    features: tuple[str, ...]
    per_feature: tuple[FeatureReference, ...]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "DriftReference | None":
        if not manifest.training_stats or any(f not in manifest.training_stats for f in manifest.feature_names):
            return None  # a model stored without reference data: nothing to compare with
        refs = []
        for name in manifest.feature_names:
            stats = manifest.training_stats[name]
            sample = np.asarray(stats.sample, dtype=np.float64)
            n = len(sample)
            refs.append(
                FeatureReference(
                    inner_edges=np.asarray(stats.bin_edges[1:-1], dtype=np.float64),
                    fractions=np.asarray(stats.bin_fractions, dtype=np.float64),
                    sample=sample,
                    cdf_lt=np.searchsorted(sample, sample, side="left") / n,
                    cdf_le=np.searchsorted(sample, sample, side="right") / n,
                )
            )
        return cls(manifest.name, manifest.version, tuple(manifest.feature_names), tuple(refs))


@dataclass
class WindowCounts:
    """Additive summary of a window of rows (one replica's, or the sum of several)."""

    rows: int
    bins: list[np.ndarray]  # per feature: rows per training bin
    lt: list[np.ndarray]  # per feature: rows strictly below each sample point
    le: list[np.ndarray]  # per feature: rows at or below each sample point

    @classmethod
    def of(cls, reference: DriftReference, window: np.ndarray) -> "WindowCounts":
        bins, lt, le = [], [], []
        for column, ref in zip(window.T, reference.per_feature):
            ordered = np.sort(column)
            bins.append(np.bincount(np.searchsorted(ref.inner_edges, column, side="right"), minlength=len(ref.fractions)))
            lt.append(np.searchsorted(ordered, ref.sample, side="left"))
            le.append(np.searchsorted(ordered, ref.sample, side="right"))
        return cls(len(window), bins, lt, le)

    def __add__(self, other: "WindowCounts") -> "WindowCounts":
        return WindowCounts(
            self.rows + other.rows,
            [a + b for a, b in zip(self.bins, other.bins)],
            [a + b for a, b in zip(self.lt, other.lt)],
            [a + b for a, b in zip(self.le, other.le)],
        )

    def to_wire(self) -> dict[str, Any]:
        return {"rows": self.rows, "bins": self.bins, "lt": self.lt, "le": self.le}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> "WindowCounts":
        return cls(int(data["rows"]), list(data["bins"]), list(data["lt"]), list(data["le"]))


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
    """PSI, KS and a status per feature for the rows summarised by `counts`."""
    features: dict[str, Any] = {}
    for name, ref, bins, lt, le in zip(reference.features, reference.per_feature, counts.bins, counts.lt, counts.le):
        if counts.rows == 0:
            psi_value = ks_value = 0.0
        else:
            psi_value = psi(ref.fractions, np.asarray(bins) / counts.rows)
            ks_value = float(
                max(
                    np.max(np.abs(np.asarray(lt) / counts.rows - ref.cdf_lt)),
                    np.max(np.abs(np.asarray(le) / counts.rows - ref.cdf_le)),
                )
            )
        features[name] = {
            "psi": round(psi_value, 6),
            "ks": round(ks_value, 6),
            "status": feature_status(psi_value, ks_value, counts.rows, thresholds),
        }
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
