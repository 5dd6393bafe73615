"""What the store records about each model version, and the statistics drift is measured against."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.model.schema import CategoryStats, InputSchema

MANIFEST_FILENAME = "manifest.json"
MODEL_FILENAMES = {"skops": "model.skops", "joblib": "model.joblib"}
COMPILED_FILENAME = "model.onnx"  # the compiled model beside the scikit-learn one (compiled.py)
Runtime = Literal["onnxruntime", "sklearn"]
RUNTIMES: tuple[Runtime, ...] = ("onnxruntime", "sklearn")
# What a manifest written before compiled inference says about its runtime.
NOT_COMPILED_REASON = "stored before compiled inference: no compiled model"
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HISTOGRAM_BINS = 10
REFERENCE_SAMPLE_SIZE = 256


class FeatureStats(BaseModel):
    """Training-time distribution of one feature (the drift monitor's reference)."""

    model_config = ConfigDict(extra="forbid")

    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[str, float]
    # Decile edges of the training data and the fraction of rows in each bin (for PSI).
    bin_edges: list[float]
    bin_fractions: list[float]
    # A sorted sample of training values (for a two-sample KS test).
    sample: list[float]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    created_at: str
    format: Literal["skops", "joblib"]
    model_file: str
    sha256: str
    size_bytes: int
    estimator: str
    task: Literal["classification", "regression"]
    feature_names: list[str]
    n_features: int
    classes: list[Any] | None = None
    outputs: list[str]
    dataset: str
    params: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    n_train: int = 0
    n_test: int = 0
    training_stats: dict[str, FeatureStats] = Field(default_factory=dict)
    # Named, typed columns (a Pipeline fitted on a DataFrame). None: every feature is a number
    # and requests are one float64 matrix (the built-in models, and every manifest written
    # before typed columns). `category_stats` is the training distribution of each string and
    # boolean column (its numeric columns are in `training_stats`).
    input_schema: Optional[InputSchema] = None
    category_stats: dict[str, CategoryStats] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    created_by: str = ""
    # Which runtime serves this version and why, decided at publish time. Optional with
    # defaults, so manifests written before compiled inference still load (as scikit-learn).
    runtime: Runtime = "sklearn"
    runtime_reason: str = NOT_COMPILED_REASON
    compiled_file: Optional[str] = None  # COMPILED_FILENAME when runtime is onnxruntime
    compiled_sha256: Optional[str] = None
    compiled_size_bytes: Optional[int] = None
    # compiled.Verification.as_dict(): input dtype, rows checked, label mismatches, max
    # |difference| and its tolerance, conversion time, converter and runtime versions.
    verification: Optional[dict[str, Any]] = None

    @property  # shadows pydantic's deprecated `BaseModel.schema()`, which nothing here calls
    def schema(self) -> InputSchema:  # type: ignore[override]
        """The columns a request sends: the recorded schema, or one number per feature."""
        return self.input_schema if self.input_schema is not None else InputSchema.numeric(self.feature_names)

    @property
    def typed(self) -> bool:
        """Whether requests are checked column by column (not the all-numeric fast path)."""
        return not self.schema.all_numeric

    @model_validator(mode="after")
    def _schema_matches_features(self) -> "Manifest":
        if self.input_schema is not None and self.input_schema.names != self.feature_names:
            raise ValueError(f"input_schema columns {self.input_schema.names} are not feature_names {self.feature_names}")
        return self

    @model_validator(mode="after")
    def _compiled_fields_together(self) -> "Manifest":
        compiled = (self.compiled_file, self.compiled_sha256, self.compiled_size_bytes, self.verification)
        if self.runtime == "onnxruntime" and any(v is None for v in compiled):
            raise ValueError("runtime onnxruntime needs compiled_file, compiled_sha256, compiled_size_bytes and verification")
        if self.compiled_file is not None and self.compiled_file != COMPILED_FILENAME:
            raise ValueError(f"compiled_file must be {COMPILED_FILENAME!r}, got {self.compiled_file!r}")
        return self


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import joblib
    import sklearn

    versions = {
        "python": platform.python_version(),
        "sklearn": sklearn.__version__,
        "joblib": joblib.__version__,
        "numpy": np.__version__,
    }
    try:
        import skops

        versions["skops"] = skops.__version__
    except ImportError:  # pragma: no cover - skops is a declared dependency
        pass
    return versions


def feature_stats(column: np.ndarray, rng: np.random.Generator) -> FeatureStats:
    column = np.asarray(column, dtype=np.float64)
    edges = np.unique(np.quantile(column, np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)))
    if len(edges) < 2:  # a constant feature still gets one bin
        edges = np.array([column[0] - 0.5, column[0] + 0.5])
    counts, _ = np.histogram(column, bins=edges)
    size = min(REFERENCE_SAMPLE_SIZE, len(column))
    sample = np.sort(rng.choice(column, size=size, replace=False))
    return FeatureStats(
        mean=float(column.mean()),
        std=float(column.std()),
        min=float(column.min()),
        max=float(column.max()),
        quantiles={str(q): float(np.quantile(column, q)) for q in QUANTILES},
        bin_edges=edges.tolist(),
        bin_fractions=(counts / counts.sum()).tolist(),
        sample=sample.tolist(),
    )


def training_stats(features: np.ndarray, names: list[str], seed: int = 0) -> dict[str, FeatureStats]:
    rng = np.random.default_rng(seed)
    return {name: feature_stats(features[:, i], rng) for i, name in enumerate(names)}
