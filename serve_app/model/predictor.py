"""The model runtime: load a verified version from the store and predict on numpy arrays.

It knows nothing of HTTP or Ray; the deployment, the batch job and embedded users all
call the same `Predictor`:

    >>> from serve_app import Predictor
    >>> predictor = Predictor.load("models", "iris")          # the `production` alias
    >>> predictor.predict(predictor.validate([[5.1, 3.5, 1.4, 0.2]]))
    array([0])

A model with named, typed columns (a Pipeline fitted on a DataFrame: manifest `input_schema`)
takes a `ColumnTable` (what the protocol decoders make), a pandas DataFrame or records
(`{"column": value}` dicts); `validate` checks each column against the schema, and the model
gets a DataFrame with the dtypes it was fitted with. All-numeric models keep the float64
matrix path, with no pandas.

A version published with a verified compiled model (manifest `runtime: onnxruntime`) is
answered by ONNX Runtime (`Predictor.runtime`, `runtime_reason` say so), unless the caller
asks for scikit-learn (`runtime="sklearn"`, AppSettings.runtime). Its labels are
scikit-learn's on every row checked at publish time, its probabilities within the
tolerance the manifest records.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.utils.extmath import softmax

from serve_app.errors import InvalidInput, ModelLoadError, PayloadTooLarge
from serve_app.model.manifest import Manifest, Runtime
from serve_app.model.encoder import TableEncoder, probe_records
from serve_app.settings import DEFAULT_MAX_ROWS, RuntimeChoice
from serve_app.model.store import DEFAULT_ALIAS, ModelStore
from serve_app.protocol.columns import ColumnTable, decode_frame, decode_records

if TYPE_CHECKING:
    from serve_app.model.compiled import CompiledModel

PREDICT = "predict"
PREDICT_PROBA = "predict_proba"
VALID_OUTPUTS = (PREDICT, PREDICT_PROBA)
# scikit-learn classifiers whose `predict` is computed from the same evaluation as
# `predict_proba` (the forest's `predict` *is* classes_[argmax(predict_proba)]; HGB's both
# start from `_raw_predict`), so both outputs come from one pass over the trees. Exact types:
# a subclass may override either method. A multinomial LogisticRegression gets the same from
# its direct arithmetic (one matrix product), and a compiled model always does.
ONE_EVALUATION = {
    "sklearn.ensemble._forest.RandomForestClassifier": "forest",
    "sklearn.ensemble._forest.ExtraTreesClassifier": "forest",
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier": "hist_gradient_boosting",
}


def one_evaluation_kind(model: Any) -> str | None:
    """How `model` answers predict and predict_proba from one evaluation, or None."""
    kind = ONE_EVALUATION.get(f"{type(model).__module__}.{type(model).__qualname__}")
    if kind == "forest" and getattr(model, "n_outputs_", 1) != 1:
        return None  # multi-output: classes_ is a list, predict is per output
    return kind


def served_directly(model: Any) -> bool:
    """A plain LogisticRegression: the Predictor does its arithmetic in numpy, bit-identical to
    scikit-learn and faster than ONNX Runtime for it (~3 µs against ~15 µs a row, measured here)."""
    return type(model) is LogisticRegression


class Predictor:
    def __init__(
        self,
        model: Any,
        manifest: Manifest,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        compiled: "CompiledModel | None" = None,
        runtime_reason: str | None = None,
    ) -> None:
        self.model = model
        self.manifest = manifest
        self.max_rows = max_rows
        self.compiled = compiled
        """The ONNX Runtime session answering for this version, or None: scikit-learn answers."""
        self.runtime_reason = runtime_reason if runtime_reason is not None else manifest.runtime_reason
        """Why `runtime` serves this version (the manifest's reason, or why the replica differs)."""
        self.outputs = tuple(o for o in manifest.outputs if o in VALID_OUTPUTS)
        n_in = getattr(model, "n_features_in_", manifest.n_features)
        if n_in != manifest.n_features:
            raise ModelLoadError(
                f"{manifest.name} v{manifest.version}: the model takes {n_in} features, "
                f"its manifest says {manifest.n_features}"
            )
        if compiled is not None and compiled.classes is not None and compiled.classes.tolist() != manifest.classes:
            raise ModelLoadError(
                f"{manifest.name} v{manifest.version}: the compiled model's classes {compiled.classes.tolist()} "
                f"are not the manifest's {manifest.classes}; refusing it"
            )
        self.schema = manifest.schema
        self.typed = manifest.typed
        """Whether requests are named, typed columns (`ColumnTable`s), not a float64 matrix."""
        if not self.typed and compiled is None and getattr(model, "feature_names_in_", None) is not None:
            # Fitted on a DataFrame of numbers but answered from the validated matrix, whose
            # columns are in the schema's order: scikit-learn's per-call warning says nothing.
            warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)
        # A Pipeline's last step evaluated once for predict and predict_proba, on the output of
        # the steps before it (typed models are Pipelines whose first steps encode the columns).
        self._head, final = _split_pipeline(model)
        self._final = final
        self._encoder, self.encoder_reason = (
            _verified_encoder(self._head, manifest) if self.typed and self._head is not None and compiled is None
            else (None, "")
        )
        """serve_app's numpy transform of the Pipeline's ColumnTransformer (encoder.py), and why
        it is used or not; None: scikit-learn transforms the rows."""
        self._linear = model if served_directly(model) else None
        # Softmax of the scores is sklearn's predict_proba only for a multinomial model;
        # before sklearn 1.8, multi_class="ovr" or the liblinear solver meant one-vs-rest.
        self._softmax_proba = self._linear is not None and (
            getattr(model, "multi_class", "auto") != "ovr" and getattr(model, "solver", "lbfgs") != "liblinear"
        )
        self._one_evaluation = one_evaluation_kind(final)
        self._canned_row: np.ndarray | ColumnTable = (
            decode_records([canned_record(manifest)], self.schema, "the health check's record", single=True)
            if self.typed
            else np.array([[manifest.training_stats[f].mean if f in manifest.training_stats else 0.0 for f in manifest.feature_names]])
        )

    @classmethod
    def load(
        cls,
        store: ModelStore | str | os.PathLike[str],
        name: str,
        ref: str | int = DEFAULT_ALIAS,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        expected_features: int | None = None,
        runtime: RuntimeChoice = "auto",
        threads: int | None = None,
    ) -> "Predictor":
        """Loads `name` at a version or alias, refusing a file or library that doesn't match.

        With `runtime="auto"`, a version whose manifest says onnxruntime is answered by its
        compiled model: read with the model file, checked against the signature and the
        manifest's hash (a changed file refuses the version), then against the graph rules
        (`compiled.parse_safe`), before ONNX Runtime opens it with `threads` threads
        (default: the CPUs this process was given, `compiled.default_threads`).
        """
        store = store if isinstance(store, ModelStore) else ModelStore(store)

        def check(manifest: Manifest) -> None:  # on the verified manifest, before the model is read
            check_library_versions(manifest)
            if expected_features is not None and expected_features != manifest.n_features:
                raise ModelLoadError(
                    f"the config expects {expected_features} features but {name} v{manifest.version} "
                    f"takes {manifest.n_features} ({', '.join(manifest.feature_names)})"
                )

        model, manifest = store.load_verified(name, ref, check)
        if manifest.runtime != "onnxruntime":
            return cls(model, manifest, max_rows=max_rows)
        if runtime == "sklearn":
            reason = f"scikit-learn forced by the runtime setting (the compiled model {manifest.runtime_reason})"
            return cls(model, manifest, max_rows=max_rows, runtime_reason=reason)
        from serve_app.model import compiled

        verified_with = (manifest.verification or {}).get("versions", {}).get("onnxruntime")
        installed = compiled.onnxruntime.__version__
        if verified_with != installed:
            reason = (f"served by scikit-learn: the compiled model was verified with onnxruntime {verified_with}, "
                      f"{installed} is installed (publish the version again to verify it with this one)")
            return cls(model, manifest, max_rows=max_rows, runtime_reason=reason)
        session = compiled.CompiledModel.load(store.load_compiled(manifest), threads or compiled.default_threads())
        return cls(model, manifest, max_rows=max_rows, compiled=session)

    @property
    def runtime(self) -> Runtime:
        """Which runtime answers: "onnxruntime" (the version's compiled model) or "sklearn"."""
        return "onnxruntime" if self.compiled is not None else "sklearn"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def n_features(self) -> int:
        return self.manifest.n_features

    def validate(self, rows: Any) -> Any:
        """The rows as the model takes them, or a 4xx error saying why not: a finite float64
        [n, n_features] array, or for a typed model a `ColumnTable` checked column by column.

        Every caller comes through here: the HTTP routes with arrays the protocol decoders
        made (numbers already, of the request's datatype), Ray handles and the batch job with
        whatever they were given. The checks are the ones a model needs, each done once.
        """
        if self.typed:
            return self._validate_table(rows)
        array = np.asarray(rows)
        if array.dtype.kind not in "iuf":  # a decoded request always passes; a handle's list may not
            raise InvalidInput(f"features must be numbers, got {array.dtype} values")
        if array.ndim == 1 and array.size == self.n_features:
            array = array.reshape(1, -1)
        if array.ndim != 2:
            raise InvalidInput(
                f"expected rows of {self.n_features} features (shape [rows, {self.n_features}]), "
                f"got shape {list(array.shape)}"
            )
        if array.shape[1] != self.n_features:
            raise InvalidInput(
                f"each row needs {self.n_features} features "
                f"({', '.join(self.manifest.feature_names)}), got {array.shape[1]}"
            )
        if array.shape[0] == 0:
            raise InvalidInput("no rows to predict; send at least one row")
        if array.shape[0] > self.max_rows:
            raise PayloadTooLarge(
                f"{array.shape[0]} rows in one request; the limit is {self.max_rows} (split the request)"
            )
        if array.dtype.kind == "f":  # integers are always finite
            self._check_finite(array)
        # The model reads float64 in C order. A binary V2 tensor is a view of the request
        # body, of its datatype and at any offset: this is where it is copied, once, if it
        # is not float64 already or sits at an unaligned address.
        return np.require(array, np.float64, ["C_CONTIGUOUS", "ALIGNED"])

    def _validate_table(self, rows: Any) -> ColumnTable:
        if isinstance(rows, ColumnTable):
            if rows.schema is not self.schema and rows.schema != self.schema:  # decoded for another version's columns
                raise InvalidInput(f"the rows were decoded for other columns than {self.name} v{self.version} takes "
                                   f"({', '.join(self.schema.names)})")
            table = rows
        elif hasattr(rows, "columns") and hasattr(rows, "dtypes"):  # a pandas DataFrame
            table = decode_frame(rows, self.schema)
        elif isinstance(rows, dict):
            table = decode_records([rows], self.schema, "the record", single=True)
        elif isinstance(rows, (list, tuple)) and all(isinstance(row, dict) for row in rows):
            table = decode_records(list(rows), self.schema, "the records")
        else:
            raise InvalidInput(
                f"{self.name} v{self.version} takes named columns ({', '.join(self.schema.names)}): send a "
                f"pandas DataFrame, a record {{column: value}} or a list of records, not {type(rows).__name__}"
            )
        if table.n_rows > self.max_rows:
            raise PayloadTooLarge(f"{table.n_rows} rows in one request; the limit is {self.max_rows} (split the request)")
        return table

    def _check_finite(self, rows: np.ndarray) -> None:
        # On the request's own dtype, before any conversion (float32 halves the work).
        finite = np.isfinite(rows)
        if finite.all():
            return
        row, column = map(int, np.argwhere(~finite)[0])
        raise InvalidInput(
            f"row {row}, feature {column} ({self.manifest.feature_names[column]}) is "
            f"{rows[row, column]}; features must be finite numbers"
        )

    def check_outputs(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self.outputs]
        if unknown:
            raise InvalidInput(
                f"unknown output {unknown[0]!r} for {self.name} v{self.version}; "
                f"available: {', '.join(self.outputs)}"
            )

    # The inputs below are already validated, so sklearn's own checks are skipped: either
    # with assume_finite, or for a plain LogisticRegression by doing its arithmetic directly
    # (the same numpy operations in the same order, so the results are bit-identical).

    @staticmethod
    def _model_input(rows: Any) -> Any:
        """What the scikit-learn model is called with: the matrix, or a table's DataFrame."""
        return rows.to_dataframe() if isinstance(rows, ColumnTable) else rows

    def _encoded(self, rows: Any) -> np.ndarray | None:
        """A table as the Pipeline's last step takes it, by serve_app's encoder; None where it
        does not answer (no encoder, or an unknown category it leaves to scikit-learn)."""
        if self._encoder is None or not isinstance(rows, ColumnTable):
            return None
        return self._encoder.transform(rows)

    def predict(self, rows: Any) -> np.ndarray:
        if self.compiled is not None:
            return self.compiled.predict(rows)
        if self._linear is not None:
            # Finite but huge features (1e308) overflow the scores to inf/nan, as they do in
            # sklearn: the same answer, without a RuntimeWarning in the replica log.
            with np.errstate(over="ignore", invalid="ignore"):
                scores = rows @ self._linear.coef_.T + self._linear.intercept_
            if scores.shape[1] == 1:
                return self._linear.classes_.take((scores.ravel() > 0).astype(np.intp))
            return self._linear.classes_.take(scores.argmax(axis=1))
        if self._one_evaluation == "forest":  # the trees called directly (forest_proba)
            return self.predict_with_proba(rows)[0]
        encoded = self._encoded(rows)
        with sklearn.config_context(assume_finite=True):
            if encoded is not None:
                return np.asarray(self._final.predict(encoded))
            return np.asarray(self.model.predict(self._model_input(rows)))

    def predict_proba(self, rows: Any) -> np.ndarray:
        if PREDICT_PROBA not in self.outputs:
            raise InvalidInput(f"{self.name} v{self.version} ({self.manifest.estimator}) has no predict_proba")
        if self.compiled is not None:
            return self.compiled.predict_proba(rows)
        if self._linear is not None and self._softmax_proba and len(self._linear.classes_) > 2:
            with np.errstate(over="ignore", invalid="ignore"):
                return softmax(rows @ self._linear.coef_.T + self._linear.intercept_, copy=False)
        if self._one_evaluation == "forest":
            return self.predict_with_proba(rows)[1]
        encoded = self._encoded(rows)
        with sklearn.config_context(assume_finite=True):
            if encoded is not None:
                return np.asarray(self._final.predict_proba(encoded))
            return np.asarray(self.model.predict_proba(self._model_input(rows)))

    @property
    def one_evaluation(self) -> bool:
        """Whether `predict_with_proba` evaluates the model once for both outputs."""
        return self.compiled is not None or self._one_evaluation is not None or (
            self._linear is not None and self._softmax_proba and len(self._linear.classes_) > 2
        )

    def predict_with_proba(self, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        """`predict` and `predict_proba` of a classifier, from one evaluation where the runtime
        allows it (`one_evaluation`), each exactly what the method alone answers."""
        if PREDICT_PROBA not in self.outputs:
            raise InvalidInput(f"{self.name} v{self.version} ({self.manifest.estimator}) has no predict_proba")
        if self.compiled is not None:
            return self.compiled.predict_with_proba(rows)
        kind = self._one_evaluation
        encoded = self._encoded(rows) if kind is not None else None
        if encoded is not None:
            rows = encoded
        elif kind is not None and self._head is not None:  # a Pipeline: its first steps once, then as below
            with sklearn.config_context(assume_finite=True):
                rows = self._head.transform(self._model_input(rows))
        elif kind is not None:
            rows = self._model_input(rows)
        final = self._final
        if kind == "forest":  # ForestClassifier.predict, as scikit-learn writes it
            proba = forest_proba(final, rows)
            return final.classes_.take(np.argmax(proba, axis=1), axis=0), proba
        if kind == "hist_gradient_boosting":  # HistGradientBoostingClassifier.predict and predict_proba
            with sklearn.config_context(assume_finite=True):
                raw = final._raw_predict(rows)
            encoded = (raw.ravel() > 0).astype(int) if raw.shape[1] == 1 else np.argmax(raw, axis=1)
            return final.classes_[encoded], final._loss.predict_proba(raw)
        if self._linear is not None and self._softmax_proba and len(self._linear.classes_) > 2:
            with np.errstate(over="ignore", invalid="ignore"):
                scores = rows @ self._linear.coef_.T + self._linear.intercept_
            return self._linear.classes_.take(scores.argmax(axis=1)), softmax(scores, copy=False)
        return self.predict(rows), self.predict_proba(rows)

    def run(self, rows: Any, outputs: Sequence[str] = (PREDICT,)) -> dict[str, np.ndarray]:
        """The named outputs for `rows`; predict and predict_proba together from one evaluation."""
        self.check_outputs(outputs)
        if PREDICT in outputs and PREDICT_PROBA in outputs:
            labels, proba = self.predict_with_proba(rows)
            both = {PREDICT: labels, PREDICT_PROBA: proba}
            return {name: both[name] for name in outputs}
        return {name: getattr(self, name)(rows) for name in outputs}

    def check_health(self) -> None:
        """Scores one canned row; raises if the model cannot answer."""
        result = self.predict(self._canned_row)
        if result.shape[0] != 1:
            raise RuntimeError(f"health check: expected 1 prediction, got shape {result.shape}")

    def metadata(self) -> Mapping[str, Any]:
        """The manifest (without training statistics), with the runtime this process serves by."""
        return {
            **self.manifest.model_dump(mode="json", exclude={"training_stats", "category_stats"}),
            "runtime": self.runtime,
            "runtime_reason": self.runtime_reason,
            **({"column_encoder": self.encoder_reason} if self.encoder_reason else {}),
        }


def forest_proba(forest: Any, rows: Any) -> np.ndarray:
    """`ForestClassifier.predict_proba` of validated rows, bit for bit, without its machinery.

    scikit-learn runs each tree through joblib (`Parallel`, and per tree a wrapper that
    re-applies the caller's sklearn config and every warning filter), then validates the
    input once per tree. Sampled with py-spy in a Ray replica answering one-row requests to
    a 100-tree forest, the trees' own traversal was ~10% of the model call, and joblib and
    the wrappers ~75% (more filters in a replica process: more cost). Here the trees are
    summed in the order scikit-learn sums them with n_jobs=1, on the float32 input it makes.
    A sparse input (a one-hot encoder's default output) takes scikit-learn's own path.
    """
    if not isinstance(rows, np.ndarray):
        with sklearn.config_context(assume_finite=True):
            return np.asarray(forest.predict_proba(rows))
    features = np.ascontiguousarray(rows, dtype=np.float32)
    proba = np.zeros((features.shape[0], forest.n_classes_), dtype=np.float64)
    for tree in forest.estimators_:
        proba += tree.predict_proba(features, check_input=False)
    proba /= len(forest.estimators_)
    return proba


def _verified_encoder(head: Any, manifest: Manifest) -> tuple[TableEncoder | None, str]:
    """serve_app's encoder for a typed Pipeline's head, if it gives scikit-learn's own output on
    a probe of every known category, a null per nullable column and the training's spread."""
    encoder, why = TableEncoder.build(head, manifest.schema)
    if encoder is None:
        return None, f"scikit-learn ({why})"
    try:
        probe = decode_records(probe_records(manifest), manifest.schema, "the encoder's probe")
        problem = encoder.verify(head, probe)
    except Exception as exc:  # noqa: BLE001 - any failure means: let scikit-learn transform
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        return None, f"scikit-learn (serve_app's encoder differed on its probe: {problem})"
    return encoder, f"serve_app, numpy ({why}; identical to scikit-learn on a probe of {probe.n_rows} rows)"


def _split_pipeline(model: Any) -> tuple[Any, Any]:
    """(the steps before the last, the last step) of a Pipeline; (None, model) otherwise."""
    from sklearn.pipeline import Pipeline

    if isinstance(model, Pipeline) and len(model.steps) > 1:
        return model[:-1], model[-1]
    return None, model


def canned_record(manifest: Manifest) -> dict[str, Any]:
    """A typical record for a typed model (health checks): each number its training mean,
    each category its most frequent one, a null where a column allows nothing else known."""
    record: dict[str, Any] = {}
    for column in manifest.schema.columns:
        numeric = manifest.training_stats.get(column.name)
        frequencies = manifest.category_stats[column.name].frequencies if column.name in manifest.category_stats else {}
        if column.kind == "number":
            record[column.name] = numeric.mean if numeric is not None else (None if column.nullable else 0.0)
        elif column.kind == "integer":
            record[column.name] = round(numeric.mean) if numeric is not None else (None if column.nullable else 0)
        elif column.kind == "boolean":
            record[column.name] = next(iter(frequencies), "false") == "true"
        else:
            known = next(iter(frequencies), None) or next(iter(column.categories or ()), None)
            record[column.name] = known if known is not None else (None if column.nullable else "")
    return record


def check_library_versions(manifest: Manifest) -> None:
    stored = manifest.versions.get("sklearn")
    if stored and stored != sklearn.__version__:
        raise ModelLoadError(
            f"{manifest.name} v{manifest.version} was saved with scikit-learn {stored} but "
            f"{sklearn.__version__} is installed; install scikit-learn=={stored} or retrain it "
            f"with: serve-app train --name {manifest.name}"
        )
