"""Compiled inference: a scikit-learn model converted to ONNX, verified, and run by ONNX Runtime.

At publish time `convert(estimator, sample, held_out)` converts the fitted estimator with
skl2onnx and checks the result against scikit-learn itself, through the same
`CompiledModel` a replica will use, on the stored sample and a held-out set. It returns a
`Compiled` (the ONNX bytes and a `Verification` record for the manifest) or a `Refusal`
saying why this version is served by scikit-learn instead.

A replica calls `CompiledModel.load(onnx_bytes, threads)`. The bytes are parsed and checked
before ONNX Runtime sees them: a model file must never run code or read other files, so
a graph with external data, an operator outside the standard ONNX domains, local
functions or training graphs is refused (`UnsafeGraph`), and no custom-op library is
ever registered.

Inputs: float64 where the converter and ONNX Runtime support it end to end (linear models,
pipelines of them, random forest classifiers), otherwise float32 (gradient boosting,
forest regressors); the verification record says which. Verification is statistical: it
proves equality on the rows it checks, so those rows must look like real traffic.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import onnx
import onnxruntime

from serve_app.errors import ModelLoadError

# Operator domains a served graph may use: the standard operators and the ONNX-ML ones.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
# Where the estimator's classes (and their dtype) travel inside the ONNX file, so the file
# alone, hashed and signed, is enough to answer exactly as scikit-learn does.
CLASSES_KEY = "serve_app.classes"
TASK_KEY = "serve_app.task"
# Tolerances of the verification, by the input dtype the graph was converted for. Labels
# must be identical on every row whatever the dtype.
# Probabilities, absolute. float64: linear models are bit-for-bit or 1e-16 off, forests 5e-8
# (their leaves are summed in float32). float32: skl2onnx stores gradient-boosting thresholds
# as float32, so a row whose feature lies between float32(threshold) and threshold takes the
# other branch in one tree: 1 row in 10,000 moved by 1.8e-4 (200 iterations, 30 features).
PROBA_ATOL = {"float64": 1e-6, "float32": 1e-3}
# Regression, absolute, times max(1, largest |prediction| checked): float32 accumulates
# rounding in proportion to the size of the summed terms (3.8e-4 on predictions of ~500).
REGRESSION_RTOL = {"float64": 1e-6, "float32": 1e-5}
# The order inputs are tried in. float64 is scikit-learn's own arithmetic; float32 is the
# converter's fallback (its gradient-boosting and forest-regressor graphs take float only),
# and comes first for a bare forest or tree, which scikit-learn itself reads as float32.
InputDtype = Literal["float64", "float32"]
INPUT_DTYPES: tuple[InputDtype, ...] = ("float64", "float32")

RefusalKind = Literal["unsupported", "converter_error", "mismatch"]


class UnsafeGraph(ModelLoadError):
    """An ONNX file that could read other files or load code; refused before it is run."""


@dataclass(frozen=True)
class Verification:
    """What was checked at publish time; goes into the manifest as is (`asdict`)."""

    input_dtype: str
    rows_checked: int
    label_mismatches: int  # classifiers; 0 for a regressor
    max_abs_diff: float  # probabilities (classifier) or predictions (regressor)
    tolerance: float  # the bound max_abs_diff was held to
    seconds_to_convert: float
    versions: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Compiled:
    onnx_bytes: bytes
    verification: Verification


@dataclass(frozen=True)
class Refusal:
    """Why a version is served by scikit-learn; `str()` is the sentence a CLI prints."""

    kind: RefusalKind
    reason: str

    def __str__(self) -> str:
        return f"served by scikit-learn ({self.kind}): {self.reason}"


def versions() -> dict[str, str]:
    import skl2onnx  # the converter (~1.8 s to import) is needed at publish time only, never in a replica

    return {"skl2onnx": skl2onnx.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


# ---------------------------------------------------------------------------------------------
# Loading and running


class CompiledModel:
    """An ONNX Runtime session answering `predict` / `predict_proba` exactly as scikit-learn does:
    the same shapes, dtypes (float64 probabilities and predictions) and class labels."""

    def __init__(self, session: onnxruntime.InferenceSession, classes: np.ndarray | None) -> None:
        self.session = session
        self.classes = classes
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"a compiled model takes one input tensor, this one takes {len(inputs)}")
        self._input = inputs[0].name
        self.input_dtype = np.float64 if inputs[0].type == "tensor(double)" else np.float32
        outputs = session.get_outputs()
        if classes is not None:
            # skl2onnx's label output breaks ties its own way (a 10-tree forest at 5 votes
            # each answered class 1 where scikit-learn answers class 0), so labels are
            # scikit-learn's rule, argmax of the probabilities, over the probability output.
            proba = [o.name for o in outputs if o.type in ("tensor(float)", "tensor(double)")]
            if len(outputs) != 2 or len(proba) != 1:
                raise ModelLoadError(f"a compiled classifier has a label and a probability output, got {len(outputs)}")
            self._output = proba[0]
        elif len(outputs) != 1:
            raise ModelLoadError(f"a compiled regressor has one output, got {len(outputs)}")
        else:
            self._output = outputs[0].name

    @classmethod
    def load(cls, onnx_bytes: bytes, threads: int) -> "CompiledModel":
        """Checks the graph is safe, then opens it on the CPU with `threads` threads (the replica's CPUs)."""
        if threads < 1:
            raise ValueError(f"threads must be at least 1 (the replica's CPUs), got {threads}")
        model = parse_safe(onnx_bytes)
        meta = {p.key: p.value for p in model.metadata_props}
        classes = _decode_classes(meta[CLASSES_KEY]) if CLASSES_KEY in meta else None
        session = onnxruntime.InferenceSession(
            onnx_bytes, sess_options=session_options(threads), providers=["CPUExecutionProvider"]
        )
        return cls(session, classes)

    @property
    def is_classifier(self) -> bool:
        return self.classes is not None

    def _run(self, rows: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        feed = np.ascontiguousarray(rows, dtype=self.input_dtype)
        return [np.asarray(o) for o in self.session.run(outputs, {self._input: feed})]

    def predict(self, rows: np.ndarray) -> np.ndarray:
        (raw,) = self._run(rows, [self._output])
        if self.classes is not None:
            return self.classes.take(raw.argmax(axis=1))
        predictions = raw.astype(np.float64)
        # ONNX answers [n, 1] for a single target; scikit-learn answers [n].
        return predictions[:, 0] if predictions.ndim == 2 and predictions.shape[1] == 1 else predictions

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        return self.predict_with_proba(rows)[1]

    def predict_with_proba(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both outputs from one evaluation (the forest is walked once, not twice)."""
        if self.classes is None:
            raise ModelLoadError("a regressor has no predict_proba")
        (proba,) = self._run(rows, [self._output])
        return self.classes.take(proba.argmax(axis=1)), proba.astype(np.float64)


def default_threads() -> int:
    """The CPUs this process may use, for ONNX Runtime's intra-op threads.

    In a Ray actor or task that is OMP_NUM_THREADS, which Ray (2.60, when the variable is not
    set already) sets from the `num_cpus` it was given (`ray_actor_options.num_cpus` for a
    replica): floor(num_cpus), at least 1, so a replica with 0.5 CPU gets 1 thread and one
    with 2 gets 2. Elsewhere OMP_NUM_THREADS if the user set it, else the CPUs this process
    may run on. Never more than the latter.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        wanted = int(os.environ.get("OMP_NUM_THREADS", "") or cpus)
    except ValueError:  # e.g. "4,2" (nested OpenMP levels): take the CPUs
        wanted = cpus
    return max(1, min(wanted, cpus))


def session_options(threads: int) -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = False
    options.optimized_model_filepath = ""  # never writes a file
    # No spinning: idle intra-op threads would burn the CPUs the replica shares with its ingress.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.add_session_config_entry("session.allow_released_opsets_only", "1")
    # Custom-op libraries: `register_custom_ops_library` is never called on these options.
    return options


# ---------------------------------------------------------------------------------------------
# The safety check


def parse_safe(onnx_bytes: bytes) -> onnx.ModelProto:
    """Parses the file as plain protobuf (no file is opened) and refuses what could read or load
    anything: external tensor data, operators outside ALLOWED_DOMAINS, local functions,
    training graphs. Raises UnsafeGraph."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(onnx_bytes)
    except Exception as exc:  # DecodeError, or a RuntimeWarning-free garbage input
        raise UnsafeGraph(f"not an ONNX model: {exc}") from None
    if not model.HasField("graph"):
        raise UnsafeGraph("not an ONNX model: it has no graph")
    for opset in model.opset_import:
        if opset.domain not in ALLOWED_DOMAINS:
            raise UnsafeGraph(f"the model imports operator domain {opset.domain!r}; allowed: {_allowed()}")
    if len(model.functions):
        raise UnsafeGraph(f"the model defines {len(model.functions)} local function(s); none are allowed")
    if len(model.training_info):
        raise UnsafeGraph("the model carries training graphs; a served model may not")
    _check_graph(model.graph, "graph")
    return model


def _allowed() -> str:
    return ", ".join(repr(d) for d in sorted(ALLOWED_DOMAINS))


def _check_tensor(tensor: onnx.TensorProto, where: str) -> None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
        raise UnsafeGraph(f"tensor {tensor.name!r} in {where} reads external data from {location!r}; not allowed")


def _check_graph(graph: onnx.GraphProto, where: str) -> None:
    for tensor in graph.initializer:
        _check_tensor(tensor, where)
    for sparse in graph.sparse_initializer:
        _check_tensor(sparse.values, where)
        _check_tensor(sparse.indices, where)
    for node in graph.node:
        if node.domain not in ALLOWED_DOMAINS:
            raise UnsafeGraph(
                f"node {node.name or node.op_type!r} in {where} uses operator {node.domain}.{node.op_type}; "
                f"allowed domains: {_allowed()}"
            )
        inner = f"{where}/{node.name or node.op_type}"
        for attr in node.attribute:
            if attr.HasField("t"):
                _check_tensor(attr.t, inner)
            for tensor in attr.tensors:
                _check_tensor(tensor, inner)
            if attr.HasField("sparse_tensor"):
                _check_tensor(attr.sparse_tensor.values, inner)
                _check_tensor(attr.sparse_tensor.indices, inner)
            for sparse in attr.sparse_tensors:
                _check_tensor(sparse.values, inner)
                _check_tensor(sparse.indices, inner)
            if attr.HasField("g"):
                _check_graph(attr.g, inner)
            for sub in attr.graphs:
                _check_graph(sub, inner)


# ---------------------------------------------------------------------------------------------
# Class labels carried in the file


def _encode_classes(classes: np.ndarray) -> str:
    values = classes.tolist()
    if classes.dtype.kind == "O" and not all(isinstance(v, str) for v in values):
        raise TypeError("object classes other than strings")
    if classes.dtype.kind not in "biufUO":
        raise TypeError(f"classes of dtype {classes.dtype}")
    return json.dumps({"dtype": classes.dtype.str if classes.dtype.kind != "O" else "object", "values": values})


def _decode_classes(text: str) -> np.ndarray:
    try:
        payload = json.loads(text)
        dtype = np.dtype(payload["dtype"]) if payload["dtype"] != "object" else np.dtype(object)
        if dtype.kind not in "biufUO":
            raise ValueError(f"dtype {dtype}")
        values = payload["values"]
        if not isinstance(values, list) or not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise ValueError("values must be a list of plain scalars")
        return np.array(values, dtype=dtype)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"the compiled model's {CLASSES_KEY} metadata is unreadable: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Conversion and verification (publish time)


def convert(
    estimator: Any,
    sample: np.ndarray,
    held_out: np.ndarray,
    *,
    threads: int = 1,
    proba_atol: float | None = None,
    regression_rtol: float | None = None,
) -> Compiled | Refusal:
    """Converts a fitted estimator and verifies it on `sample` and `held_out` rows.

    Classifiers: labels identical on every row, probabilities within PROBA_ATOL (or `proba_atol`).
    Regressors: predictions within REGRESSION_RTOL (or `regression_rtol`) x max(1, max |prediction|).
    Tries float64 input first, then float32; the first that converts and verifies wins.
    """
    import skl2onnx
    from skl2onnx.common.exceptions import MissingConverter, MissingShapeCalculator

    rows = np.concatenate([np.asarray(sample, dtype=np.float64), np.asarray(held_out, dtype=np.float64)])
    classifier = hasattr(estimator, "predict_proba") and hasattr(estimator, "classes_")
    expected_labels = np.asarray(estimator.predict(rows))
    expected_proba = np.asarray(estimator.predict_proba(rows)) if classifier else None
    failures: list[str] = []
    kind: RefusalKind = "mismatch"
    for dtype in _input_dtypes(estimator):
        started = time.perf_counter()
        try:
            onnx_bytes = _to_onnx(estimator, rows[:1].astype(dtype), classifier)
        except (MissingShapeCalculator, MissingConverter) as exc:
            return Refusal("unsupported", f"skl2onnx {skl2onnx.__version__} has no converter for "
                           f"{_unsupported_name(exc, estimator)}")
        except Exception as exc:  # the converter's own failures have no common base class
            failures.append(f"{dtype}: converter failed: {_first_line(exc)}")
            kind = "converter_error"
            continue
        seconds = time.perf_counter() - started
        try:
            compiled = CompiledModel.load(onnx_bytes, threads)
            tolerance = (proba_atol if proba_atol is not None else PROBA_ATOL[dtype]) if classifier else (
                regression_rtol if regression_rtol is not None else REGRESSION_RTOL[dtype])
            verdict = _verify(compiled, rows, expected_labels, expected_proba, tolerance)
        except Exception as exc:  # ONNX Runtime refusing the graph, or answering another shape
            failures.append(f"{dtype}: ONNX Runtime failed: {_first_line(exc)}")
            kind = "converter_error"
            continue
        if isinstance(verdict, str):
            failures.append(f"{dtype}: {verdict}")
            kind = "mismatch"
            continue
        label_mismatches, max_abs_diff, tolerance = verdict
        return Compiled(
            onnx_bytes,
            Verification(
                input_dtype=dtype,
                rows_checked=len(rows),
                label_mismatches=label_mismatches,
                max_abs_diff=max_abs_diff,
                tolerance=tolerance,
                seconds_to_convert=round(seconds, 4),
                versions=versions(),
            ),
        )
    return Refusal(kind, "; ".join(failures))


def _input_dtypes(estimator: Any) -> tuple[InputDtype, ...]:
    from sklearn.ensemble._forest import BaseForest
    from sklearn.tree import BaseDecisionTree

    if isinstance(estimator, (BaseForest, BaseDecisionTree)):
        return INPUT_DTYPES[::-1]
    return INPUT_DTYPES


def _to_onnx(estimator: Any, first_row: np.ndarray, classifier: bool) -> bytes:
    import skl2onnx

    options = {id(estimator): {"zipmap": False}} if classifier else None
    with warnings.catch_warnings():
        # skl2onnx 1.20's gradient-boosting converter hands protobuf booleans for an int list;
        # protobuf 6 accepts them with this warning, protobuf 7 refuses (hence protobuf<7).
        warnings.filterwarnings("ignore", message=".*Expected an int, got a boolean.*", category=DeprecationWarning)
        model = skl2onnx.to_onnx(estimator, first_row, options=options)
    if classifier:
        entry = model.metadata_props.add()
        entry.key, entry.value = CLASSES_KEY, _encode_classes(np.asarray(estimator.classes_))
    entry = model.metadata_props.add()
    entry.key, entry.value = TASK_KEY, "classification" if classifier else "regression"
    return bytes(model.SerializeToString())


def _verify(
    compiled: CompiledModel, rows: np.ndarray, labels: np.ndarray, proba: np.ndarray | None, tolerance: float
) -> tuple[int, float, float] | str:
    """(label mismatches, max abs diff, tolerance) when within tolerance, else why not."""
    if proba is None:
        got = compiled.predict(rows)
        if got.shape != labels.shape:
            return f"predictions of shape {got.shape}, scikit-learn's are {labels.shape}"
        expected = labels.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(expected))))
        tolerance *= scale
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= tolerance:  # NaN fails too
            return f"predictions differ by up to {diff:.3g} (tolerance {tolerance:.3g}) on {len(rows)} rows"
        return 0, diff, tolerance
    got_labels, got_proba = compiled.predict_with_proba(rows)
    if got_labels.dtype != labels.dtype or got_labels.shape != labels.shape:
        return f"labels of {got_labels.dtype} {got_labels.shape}, scikit-learn's are {labels.dtype} {labels.shape}"
    mismatches = int(np.sum(got_labels != labels))
    if got_proba.shape != proba.shape:
        return f"probabilities of shape {got_proba.shape}, scikit-learn's are {proba.shape}"
    diff = float(np.max(np.abs(got_proba - proba)))
    if mismatches:
        row = int(np.argmax(got_labels != labels))
        return (f"{mismatches} of {len(rows)} labels differ (first: row {row}, {got_labels[row]!r} "
                f"instead of {labels[row]!r})")
    if not diff <= tolerance:
        return f"probabilities differ by up to {diff:.3g} (tolerance {tolerance:.3g}) on {len(rows)} rows"
    return 0, diff, tolerance


def _first_line(exc: BaseException) -> str:
    while exc.__cause__ is not None:  # skl2onnx wraps the error that says what went wrong
        exc = exc.__cause__
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _unsupported_name(exc: BaseException, estimator: Any) -> str:
    text = str(exc)
    start = text.find("<class '")
    if start >= 0:
        return text[start + 8 : text.find("'>", start)]
    return type(estimator).__name__


__all__: Sequence[str] = (
    "ALLOWED_DOMAINS", "Compiled", "CompiledModel", "PROBA_ATOL", "REGRESSION_RTOL", "Refusal",
    "UnsafeGraph", "Verification", "convert", "default_threads", "parse_safe", "session_options",
)
