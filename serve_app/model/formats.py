"""Writing and reading model files, in the safe skops format or in joblib (pickle).

Reading is the second line of defence: the store reads a version's bytes once, checks its
publisher's signature over them (serve_app/model/signing.py), and hands those same bytes here.
Whatever the signature says, a model file may only rebuild objects of the exact classes in
`ALLOWED_CLASSES` (`module.qualname`, no prefixes, no functions, no dotted names):

- skops: every node of the file's tree must be one of those classes (or a plain str, int,
  float, bool, None, list, dict, tuple), and skops is told to trust exactly that fixed
  list, never the types the file itself names.
- joblib: a static scan of the pickle opcodes (nothing imported or called) refuses any
  other global, and any call (REDUCE/NEWOBJ) or state (BUILD) on anything but an allowed
  class; then our own restricted unpickler, over the same bytes, enforces the list again
  and reads the arrays itself (joblib's reader is not used to load).
"""

from __future__ import annotations

import importlib
import io
import pickle
import pickletools
import re
from pathlib import Path
from typing import IO, Any, Callable, ClassVar, Literal

from serve_app.errors import ModelLoadError

ModelFormat = Literal["skops", "joblib"]
_HGB_LOSSES = ("HalfBinomialLoss", "HalfMultinomialLoss", "HalfSquaredError", "AbsoluteError", "PinballLoss",
               "HalfPoissonLoss", "HalfGammaLoss")
FORMATS: tuple[ModelFormat, ...] = ("skops", "joblib")

# The classes a model file may rebuild, reviewed one by one: the estimators
# serve_app/model/training.py trains and what they contain, the small estimators the tests use,
# and numpy's arrays. Adding one is a code review, never something a file can ask for.
ALLOWED_CLASSES = frozenset(
    {
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.linear_model._base.LinearRegression",
        "sklearn.ensemble._forest.RandomForestClassifier",
        "sklearn.ensemble._forest.RandomForestRegressor",
        "sklearn.tree._classes.DecisionTreeClassifier",
        "sklearn.tree._classes.DecisionTreeRegressor",
        "sklearn.tree._tree.Tree",
        "sklearn.dummy.DummyClassifier",
        "sklearn.dummy.DummyRegressor",
        "sklearn.preprocessing._data.StandardScaler",
        "sklearn.pipeline.Pipeline",
        "numpy.ndarray",
        "numpy.dtype",
        # Gradient boosting (#16, #17): the estimators, their label encoder and bin mapper, the
        # trees (a structured array of nodes, no object fields), and the loss they were fitted
        # with. A loss is a plain Python object holding its link (no state) and two intervals
        # (numbers and booleans); its Cython half (Cy*) has no state but the pinball quantile.
        "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
        "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingRegressor",
        "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.preprocessing._label.LabelEncoder",
        *(f"sklearn._loss.loss.{c}" for c in _HGB_LOSSES),
        *(f"sklearn._loss._loss.Cy{c}" for c in _HGB_LOSSES),
        *(f"sklearn._loss.link.{c}" for c in ("IdentityLink", "LogLink", "LogitLink", "MultinomialLogit", "Interval")),
        # The random generator a fitted HistGradientBoosting keeps (never used to predict):
        # built only through the checked reconstructors below, PCG64 only.
        "numpy.random._pcg64.PCG64",
        "numpy.random.bit_generator.SeedSequence",
        # Tabular pipelines (#16). FunctionTransformer only as the identity ColumnTransformer
        # puts in place of "passthrough": `_check_data_only` refuses one carrying anything else.
        "sklearn.compose._column_transformer.ColumnTransformer",
        "sklearn.preprocessing._encoders.OneHotEncoder",
        "sklearn.preprocessing._encoders.OrdinalEncoder",
        "sklearn.impute._base.SimpleImputer",
        "sklearn.preprocessing._data.MinMaxScaler",
        "sklearn.preprocessing._function_transformer.FunctionTransformer",
    }
)
_CY_LOSSES = frozenset(c for c in ALLOWED_CLASSES if c.startswith("sklearn._loss._loss.Cy"))
_LOSSES = frozenset(c for c in ALLOWED_CLASSES if c.startswith("sklearn._loss.loss."))
_RANDOM = frozenset({"numpy.random._pcg64.PCG64", "numpy.random.bit_generator.SeedSequence"})
_GENERATOR = "numpy.random._generator.Generator"
# Objects a model may hold besides allowed-class instances: Generator is built only by the
# checked `__generator_ctor` (pickle) or skops's RandomGeneratorNode, never named as a global.
_DATA_CLASSES = ALLOWED_CLASSES | {_GENERATOR}
# skops names numpy scalars and plain values by their type; they carry data, never code.
_NUMPY_SCALARS = frozenset(
    f"numpy.{t}" for t in ("bool", "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                           "uint64", "float16", "float32", "float64", "complex64", "complex128", "str_", "bytes_")
)
_SKOPS_PLAIN = frozenset(f"builtins.{t}" for t in ("str", "int", "float", "bool", "NoneType", "list", "dict", "tuple"))
# The skops node kinds that build data or an allowed class, each with the types it may name
# (skops calls that type to build the node); FunctionNode, MethodNode, PartialNode,
# OperatorFuncNode, ConstructorFromReduceNode ... would call or hand out functions.
_SKOPS_NODES: dict[str, frozenset[str]] = {
    "DictNode": frozenset({"builtins.dict"}),
    "ListNode": frozenset({"builtins.list"}),
    "TupleNode": frozenset({"builtins.tuple"}),
    "JsonNode": _SKOPS_PLAIN,
    "NdArrayNode": frozenset({"numpy.ndarray"}) | _NUMPY_SCALARS,
    "ObjectNode": frozenset(c for c in ALLOWED_CLASSES if c.startswith("sklearn.") and c != "sklearn.tree._tree.Tree")
    - _CY_LOSSES,
    "TreeNode": frozenset({"sklearn.tree._tree.Tree"}),
    "LossNode": _CY_LOSSES,  # calls the class with the node's arguments: checked in _skops_refused
    "SliceNode": frozenset({"builtins.slice"}),  # slice(start, stop, step), ints checked
    "DTypeNode": frozenset({"numpy.dtype"}),  # the dtype of an empty array read with allow_pickle=False
    "RandomGeneratorNode": frozenset({_GENERATOR}),  # PCG64 only, checked
    "TypeNode": ALLOWED_CLASSES | _NUMPY_SCALARS | _SKOPS_PLAIN,
    "CachedNode": ALLOWED_CLASSES | _NUMPY_SCALARS | _SKOPS_PLAIN | {_GENERATOR, "builtins.slice"},
}
_SKOPS_TRUSTED = ALLOWED_CLASSES | _NUMPY_SCALARS | _SKOPS_PLAIN | {_GENERATOR, "builtins.slice"}
# How a pickle rebuilds a numpy scalar or a plain ndarray: functions, so each is called
# only through a wrapper that checks its arguments (see _RECONSTRUCTORS below).
_PICKLE_RECONSTRUCTORS = frozenset(
    {
        "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
        "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
        "builtins.slice",  # a ColumnTransformer's output_indices_: ints or None only
        "numpy.random._pickle.__generator_ctor", "numpy.random._pickle.__bit_generator_ctor",
        "numpy.random.bit_generator.__pyx_unpickle_SeedSequence",
        "sklearn._loss._loss.__pyx_unpickle_CyHalfMultinomialLoss",
    }
)
# Whose result the pickle may then give a state (BUILD): an ndarray, a PCG64, a SeedSequence.
_BUILDABLE_RESULTS = frozenset(
    {
        "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
        "numpy.random._pickle.__bit_generator_ctor", "numpy.random.bit_generator.__pyx_unpickle_SeedSequence",
    }
)
# Types a model holds as values, never calls (an encoder's dtype=np.float64): importable, not callable.
_VALUE_TYPES = _NUMPY_SCALARS
_JOBLIB_WRAPPER = "joblib.numpy_pickle.NumpyArrayWrapper"
PICKLE_GLOBALS = ALLOWED_CLASSES | _PICKLE_RECONSTRUCTORS | _VALUE_TYPES | {_JOBLIB_WRAPPER}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_allowed_global(module: str, name: str) -> bool:
    """Exactly `module.name` on the pickle allow-list: a dotted or computed name never is."""
    return (
        isinstance(module, str) and isinstance(name, str) and bool(_MODULE.fullmatch(module))
        and bool(_IDENTIFIER.fullmatch(name)) and f"{module}.{name}" in PICKLE_GLOBALS
    )


class UnsafeArtefact(ModelLoadError):
    """A model file that would import, call or build something outside the allow-list."""


def dump(model: Any, path: Path, fmt: ModelFormat) -> None:
    if fmt == "skops":
        import skops.io

        skops.io.dump(model, path)
    elif fmt == "joblib":
        import joblib

        joblib.dump(model, path)
    else:
        raise ValueError(f"unknown model format {fmt!r}; use one of {', '.join(FORMATS)}")


def load(path: Path, fmt: ModelFormat) -> Any:
    """Reads a model file from disk (tests and tools; the store uses `loads` on verified bytes)."""
    if fmt not in FORMATS:
        raise ModelLoadError(f"unknown model format {fmt!r}; use one of {', '.join(FORMATS)}")
    return loads(Path(path).read_bytes(), fmt, str(path))


def loads(data: bytes, fmt: ModelFormat, where: str) -> Any:
    """The model in `data`, rebuilt from allowed classes only; `where` names it in errors."""
    if fmt == "skops":
        tree = _skops_tree(data, where)
        try:
            model = tree.construct()
        except Exception as exc:
            raise ModelLoadError(f"cannot read skops file {where}: {exc}") from exc
        _check_data_only(model, where)
        return model
    if fmt == "joblib":
        scan_pickle(data, where)  # raises before a single opcode is executed
        try:
            model = _RestrictedUnpickler(io.BytesIO(data), where).load_all()
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot read joblib file {where}: {exc}") from exc
        _check_data_only(model, where)
        return model
    raise ModelLoadError(f"unknown model format {fmt!r}; use one of {', '.join(FORMATS)}")


def check(data: bytes, fmt: ModelFormat, where: str) -> None:
    """Refuses `data` as `loads` would, without building anything (before signing)."""
    if fmt == "skops":
        _skops_tree(data, where)
    elif fmt == "joblib":
        scan_pickle(data, where)
    else:
        raise ModelLoadError(f"unknown model format {fmt!r}; use one of {', '.join(FORMATS)}")


# ---- skops ------------------------------------------------------------------------------------


def _skops_tree(data: bytes, where: str) -> Any:
    """The file's node tree, audited against the allow-list; nothing constructed yet."""
    import zipfile

    from skops.io._audit import audit_tree, get_tree
    from skops.io._utils import read_schema

    trusted = sorted(_SKOPS_TRUSTED)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            schema, context = read_schema(archive)
            tree = get_tree(schema, context, trusted=trusted)
    except Exception as exc:
        raise ModelLoadError(f"cannot read skops file {where}: {exc}") from exc
    refused = sorted(_skops_refused(tree))
    if refused:
        raise UnsafeArtefact(
            f"{where} contains types outside the allow-list ({', '.join(refused)}); "
            "only the reviewed scikit-learn and numpy classes in serve_app/model/formats.py are loaded"
        )
    try:
        audit_tree(tree, trusted=trusted)  # skops's own check, with the same fixed list
    except Exception as exc:
        raise UnsafeArtefact(f"{where} was refused by skops's audit: {exc}") from exc
    return tree


def _skops_refused(root: Any) -> set[str]:
    from skops.io._audit import Node
    from skops.io._utils import get_module

    allowed = _SKOPS_TRUSTED
    refused: set[str] = set()
    seen: set[int] = set()
    pending = [root]
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        full = f"{node.module_name}.{node.class_name}"
        kind = type(node).__name__
        if full not in allowed:
            refused.add(full)
        elif full not in _SKOPS_NODES.get(kind, frozenset()):
            refused.add(f"{full} (as {kind})")
        else:
            problem = _skops_node_problem(node, kind)
            if problem:
                refused.add(f"{full} ({problem})")
        for child in node.children.values():
            items = child if isinstance(child, list) else list(child.values()) if isinstance(child, dict) else [child]
            for item in items:
                if isinstance(item, Node):
                    pending.append(item)
                elif type(item) is type and f"{get_module(item)}.{item.__name__}" not in allowed:
                    refused.add(f"{get_module(item)}.{item.__name__}")
    return refused


def _skops_node_problem(node: Any, kind: str) -> str:
    """What is wrong with an allowed node's own content, or "" (its children are walked anyway)."""
    from skops.io._audit import Node

    if kind == "SliceNode":
        if not all(v is None or type(v) is int for v in (node.start, node.stop, node.step)):
            return "a slice whose bounds are not integers"
    elif kind == "RandomGeneratorNode":
        if node.bit_generator_name != "PCG64":
            return f"a random generator over {node.bit_generator_name!r}, not PCG64"
    elif kind == "LossNode":
        # Built by calling the loss class with these arguments: plain numbers, or for the
        # multinomial loss Cython's own (class, checksum, ()) that the class then ignores.
        args = node.args
        items = args.children.get("content") if type(args).__name__ == "TupleNode" else None
        if not isinstance(items, list):
            return "loss arguments that are not a tuple"
        for item in items:
            own_class = (type(item).__name__ == "TypeNode"
                         and (item.module_name, item.class_name) == (node.module_name, node.class_name))
            empty = type(item).__name__ == "TupleNode" and item.children.get("content") == []
            if not (own_class or empty or type(item).__name__ == "JsonNode" and _plain_json(item.content)):
                return "a loss built from arguments that are not plain numbers"
    elif kind == "NdArrayNode":
        if node.type == "json":  # an object array: its items must be plain values
            if not all(isinstance(i, Node) and type(i).__name__ == "JsonNode" and _plain_json(i.content)
                       for i in node.items):
                return "an object array holding something other than str, int, float, bool or None"
        else:
            dtype = _npy_dtype(node.buffer.getvalue())
            if dtype is None or dtype.hasobject:
                return "an array whose stored dtype holds Python objects"
    return ""


def _plain_json(content: Any) -> bool:
    import json

    try:
        value = json.loads(content) if isinstance(content, str) else None
    except ValueError:
        return False
    return type(value) in _PLAIN


def _npy_dtype(data: bytes) -> Any:
    """The dtype in a .npy header, read without loading anything (None if unreadable)."""
    import numpy as np

    try:
        handle = io.BytesIO(data)
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return reader(handle)[2]
    except Exception:
        return None


# ---- after loading: the model holds data only ---------------------------------------------------
#
# Whatever the format, the rebuilt model is walked before it is returned: every object must be
# a plain value, a container of them, a numpy array (object arrays of plain values only), a
# numpy scalar or dtype, a slice of ints, or an instance of an allowed class. Nothing callable
# may sit anywhere scikit-learn might call it (a column selector, a FunctionTransformer's func,
# an encoder's feature_name_combiner, an imputer's strategy, a loss's link ...): the only
# callables kept are numpy scalar types in an encoder's `dtype` and a gradient boosting's own
# `_loss`. This holds even for objects that the allow-lists would build, such as an allowed
# class or one of the checked reconstructors put where a value belongs.

_PLAIN = (str, int, float, bool, type(None))
_TYPE_SLOTS = {"dtype"}
_IDENTITY_ONLY = {"func": None, "inverse_func": None, "kw_args": None, "inv_kw_args": None}


def _plain_item(value: Any) -> bool:
    import numpy as np

    return type(value) in _PLAIN or (isinstance(value, np.generic) and value.dtype.kind in "biufcUS")


def _plain_object_array(array: Any) -> bool:
    import numpy as np

    return array.dtype == np.dtype(object) and all(_plain_item(v) for v in array.ravel(order="K"))


def _full_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _check_data_only(model: Any, where: str) -> None:
    import numpy as np

    def refuse(path: str, what: str) -> UnsafeArtefact:
        return UnsafeArtefact(f"{where}: {path} is {what}; a model file may hold data only, never code, so it was refused")

    pending: list[tuple[Any, str, str]] = [(model, "the model", "")]
    seen: set[int] = set()
    while pending:
        value, path, attribute = pending.pop()
        kind = type(value)
        if kind in _PLAIN or kind is bytes:
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        if kind in (list, tuple):
            pending.extend((v, f"{path}[{i}]", "") for i, v in enumerate(value))
        elif kind is dict:
            for key, item in value.items():
                if type(key) not in _PLAIN:
                    raise refuse(path, f"a dict with a {type(key).__name__} key")
                pending.append((item, f"{path}[{key!r}]", ""))
        elif kind is slice:
            if not all(v is None or type(v) is int for v in (value.start, value.stop, value.step)):
                raise refuse(path, "a slice whose bounds are not integers")
        elif kind is np.ndarray:
            if value.dtype.hasobject and not _plain_object_array(value):
                raise refuse(path, "an array holding something other than str, int, float, bool or None")
        elif isinstance(value, (np.generic, np.dtype)):
            if isinstance(value, np.generic) and value.dtype.hasobject:
                raise refuse(path, "a numpy object scalar")
        elif isinstance(value, type):
            numeric = issubclass(value, np.generic) and value not in (np.object_, np.void)
            if not (attribute in _TYPE_SLOTS and (numeric or value in (int, float, bool, str))):
                raise refuse(path, f"the callable {value.__module__}.{value.__qualname__}")
        else:
            full = _full_name(value)
            if full not in _DATA_CLASSES:
                raise refuse(path, f"a {full}, which is not on the allow-list")
            if callable(value) and not (attribute == "_loss" and full in _LOSSES):
                raise refuse(path, f"a callable {full}")
            if full.endswith(".FunctionTransformer"):
                for name, expected in _IDENTITY_ONLY.items():
                    if getattr(value, name, None) is not expected:
                        raise refuse(f"{path}.{name}", "set: only the identity FunctionTransformer that "
                                     "ColumnTransformer uses for 'passthrough' is loaded")
                if getattr(value, "feature_names_out", None) not in (None, "one-to-one"):
                    raise refuse(f"{path}.feature_names_out", "not None or 'one-to-one'")
            if full == "numpy.random.bit_generator.SeedSequence":
                pending.extend((getattr(value, a), f"{path}.{a}", "") for a in ("entropy", "spawn_key", "pool"))
            attributes = getattr(value, "__dict__", None)
            if attributes is not None:
                if type(attributes) is not dict or not all(type(k) is str for k in attributes):
                    raise refuse(path, "an object with a non-string attribute name")
                pending.extend((v, f"{path}.{k}", k) for k, v in attributes.items())


# ---- static scan of joblib/pickle bytes -------------------------------------------------------
#
# A small symbolic pickle machine: it walks the opcodes, keeps literals, tuples, lists, dicts
# and the memo, and stands in a placeholder for every object that would be built, so nothing
# is imported or called. Every GLOBAL/STACK_GLOBAL is checked against the exact allow-list,
# REDUCE/NEWOBJ may only call an allowed class or reconstructor, BUILD may only set the
# state of an allowed class. joblib writes each numpy array's raw bytes straight after the
# array wrapper's BUILD; the scan skips them, by a size it computes from a plain dtype name.
# The loader reads arrays itself with the same rules, so a file that made the two disagree
# would still meet the allow-list in the loader.

_DTYPE_NAME = re.compile(r"^[<>|=]?([biufcUSOV])(\d{1,5})$")
_WRAPPER_KEYS = {"subclass", "shape", "order", "dtype", "allow_mmap", "numpy_array_alignment_bytes"}
_MAX_NESTED_PICKLES = 10_000
_REFUSED_OPCODES = {
    "PERSID": "persistent ids", "BINPERSID": "persistent ids",
    "EXT1": "the copyreg extension registry", "EXT2": "the copyreg extension registry",
    "EXT4": "the copyreg extension registry",
    "NEXT_BUFFER": "out-of-band buffers", "READONLY_BUFFER": "out-of-band buffers",
    "INST": "protocol 0 instances", "OBJ": "protocol 0 instances",
}


class _Mark:
    pass


_MARK = _Mark()


class _Global:
    def __init__(self, full: str) -> None:
        self.full = full


class _Built:
    """An object the real unpickler would create (by REDUCE or NEWOBJ)."""

    def __init__(self, factory: _Global | None, args: Any) -> None:
        self.factory = factory
        self.args = args
        self.state: Any = None


class _Dict(dict[Any, Any]):
    """A dict the scan tracks; `suspect` once a key could not be known or came twice."""

    suspect = False


def _pop_mark(stack: list[Any]) -> list[Any]:
    for index in range(len(stack) - 1, -1, -1):
        if stack[index] is _MARK:
            items = stack[index + 1 :]
            del stack[index:]
            return items
    raise ValueError("MARK expected on the stack")


def _plain_dtype(name: Any, state: Any) -> tuple[int, bool]:
    """(item size, object dtype?) of a dtype pickled as numpy does; ValueError otherwise.

    The size comes from the dtype's name alone, and the state must agree with it: a state
    claiming another item size (numpy would believe it) is refused, so the scan and the
    loader cannot skip different numbers of bytes.
    """
    match = _DTYPE_NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"dtype {name!r} is not a plain dtype name")
    import numpy as np

    itemsize = np.dtype(name).itemsize
    kind = match.group(1)
    if state is None:
        if kind == "V":
            raise ValueError(f"dtype {name!r} has no fields")
        return itemsize, kind == "O"
    # numpy's state: (3, byte order, subarray, names, fields, item size, alignment, flags)
    if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[2] is None):
        raise ValueError(f"dtype {name!r} has an unexpected state")
    names, fields = state[3], state[4]
    if kind == "V":  # a structured dtype (sklearn's tree nodes): plain fields inside its size
        if not (isinstance(names, tuple) and isinstance(fields, _Dict) and not fields.suspect
                and names and set(names) == set(fields) and all(type(n) is str for n in names)):
            raise ValueError(f"structured dtype {name!r} without a plain list of fields")
        for field in fields.values():
            if not (isinstance(field, tuple) and len(field) == 2 and isinstance(field[0], _Built)
                    and field[0].factory is not None and field[0].factory.full == "numpy.dtype"
                    and type(field[1]) is int and field[1] >= 0):
                raise ValueError(f"structured dtype {name!r} has a field that is not a plain dtype")
            size, nested = _plain_dtype(field[0].args[0] if isinstance(field[0].args, tuple) and field[0].args else None,
                                        field[0].state)
            if nested or field[1] + size > itemsize:
                raise ValueError(f"structured dtype {name!r} has a field outside its item size")
    elif names is not None or fields is not None:
        raise ValueError(f"dtype {name!r} has fields")
    if type(state[5]) is not int or state[5] not in (-1, itemsize):
        raise ValueError(f"dtype {name!r} claims an item size of {state[5]!r}, not {itemsize}")
    if type(state[7]) is not int or bool(state[7] & 1) != (kind == "O"):
        raise ValueError(f"dtype {name!r} has flags {state[7]!r} that do not match its kind")
    return itemsize, kind == "O"


def _array_bytes(state: Any) -> tuple[int, bool, bool]:
    """(data bytes, nested pickle?, alignment byte?) of one joblib NumpyArrayWrapper."""
    if type(state) is not _Dict or state.suspect or set(state) - _WRAPPER_KEYS or not {"shape", "dtype"} <= set(state):
        raise ValueError("array wrapper state is not a plain dict of the expected keys")
    shape, dtype = state["shape"], state["dtype"]
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"array wrapper shape {shape!r} is not a tuple of sizes")
    if not (isinstance(dtype, _Built) and dtype.factory is not None and dtype.factory.full == "numpy.dtype"):
        raise ValueError("array wrapper dtype is not a numpy.dtype")
    args = dtype.args
    if not (isinstance(args, tuple) and len(args) == 3 and args[1:] == (False, True)):
        raise ValueError(f"array wrapper dtype {args!r} is not a plain dtype")
    itemsize, is_object = _plain_dtype(args[0], dtype.state)
    count = 1
    for d in shape:
        count *= d
    return count * itemsize, is_object, state.get("numpy_array_alignment_bytes") is not None


def _scan_stream(handle: IO[bytes], where: str, found: set[str], budget: list[int]) -> None:
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def check_global(module: Any, name: Any) -> _Global:
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafeArtefact(f"{where}: a global whose name is computed; refusing it")
        found.add(f"{module}.{name}")
        if not is_allowed_global(module, name):
            raise UnsafeArtefact(
                f"{where} would import {module}.{name}, which is not on the allow-list "
                "(exact scikit-learn and numpy classes); the file was not unpickled"
            )
        return _Global(f"{module}.{name}")

    def callable_of(value: Any, op: str) -> _Global:
        if not isinstance(value, _Global) or value.full == _JOBLIB_WRAPPER and op == "REDUCE":
            raise UnsafeArtefact(f"{where}: {op} on something that is not an allowed class; refusing it")
        if value.full in _PICKLE_RECONSTRUCTORS and op != "REDUCE":
            raise UnsafeArtefact(f"{where}: {op} on {value.full}; refusing it")
        if value.full in _VALUE_TYPES:
            raise UnsafeArtefact(f"{where}: {op} on {value.full}, which a model holds as a value only; refusing it")
        return value

    for opcode, arg, _pos in pickletools.genops(handle):
        op = opcode.name
        if op in _REFUSED_OPCODES:
            raise UnsafeArtefact(f"{where} uses {_REFUSED_OPCODES[op]} ({op}); refusing it")
        if op in ("PROTO", "FRAME"):
            continue
        if op == "STOP":
            return
        if op == "MARK":
            stack.append(_MARK)
        elif op == "GLOBAL":
            module, _, name = str(arg).partition(" ")
            stack.append(check_global(module, name))
        elif op == "STACK_GLOBAL":
            name = stack.pop()
            stack.append(check_global(stack.pop(), name))
        elif op in ("REDUCE", "NEWOBJ"):
            args = stack.pop()
            factory = callable_of(stack.pop(), op)
            if not isinstance(args, tuple):
                raise UnsafeArtefact(f"{where}: {op} arguments are not a tuple; refusing it")
            stack.append(_Built(factory, args))
        elif op == "NEWOBJ_EX":
            stack.pop()
            args = stack.pop()
            stack.append(_Built(callable_of(stack.pop(), op), args))
        elif op == "BUILD":
            state = stack.pop()
            target = stack[-1]
            built_by = target.factory.full if isinstance(target, _Built) and target.factory is not None else ""
            # An allowed class, joblib's array wrapper, or what a buildable reconstructor returned.
            if not (built_by in ALLOWED_CLASSES or built_by == _JOBLIB_WRAPPER or built_by in _BUILDABLE_RESULTS):
                raise UnsafeArtefact(f"{where}: BUILD on something that is not an allowed class; refusing it")
            target.state = state
            if built_by == _JOBLIB_WRAPPER:
                _skip_array(handle, state, where, found, budget)
                stack[-1] = _Built(None, ())
        elif op in ("NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[op])
        elif op == "EMPTY_TUPLE":
            stack.append(())
        elif op == "TUPLE":
            stack.append(tuple(_pop_mark(stack)))
        elif op in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(op[-1])
            stack[-n:] = [tuple(stack[-n:])]
        elif op == "EMPTY_LIST":
            stack.append([])
        elif op == "LIST":
            stack.append(_pop_mark(stack))
        elif op == "APPEND":
            value = stack.pop()
            if isinstance(stack[-1], list):
                stack[-1].append(value)
        elif op == "APPENDS":
            items = _pop_mark(stack)
            if isinstance(stack[-1], list):
                stack[-1].extend(items)
        elif op == "EMPTY_DICT":
            stack.append(_Dict())
        elif op in ("DICT", "SETITEMS", "SETITEM"):
            items = _pop_mark(stack) if op != "SETITEM" else stack[-2:]
            if op == "SETITEM":
                del stack[-2:]
            target = _Dict() if op == "DICT" else stack[-1]
            if isinstance(target, _Dict):
                for key, value in zip(items[::2], items[1::2]):
                    if type(key) not in (str, int, float, bytes, bool, type(None)) or key in target:
                        target.suspect = True  # the real unpickler might store a key the scan cannot name
                    else:
                        target[key] = value
            if op == "DICT":
                stack.append(target)
        elif op in ("EMPTY_SET", "FROZENSET", "ADDITEMS"):
            if op == "EMPTY_SET":
                stack.append(_Built(None, ()))
            else:
                _pop_mark(stack)
                if op == "FROZENSET":
                    stack.append(_Built(None, ()))
        elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(str(arg))] = stack[-1]
        elif op == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif op in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[int(str(arg))])
        elif op == "POP":
            stack.pop()
        elif op == "POP_MARK":
            _pop_mark(stack)
        elif op == "DUP":
            stack.append(stack[-1])
        elif opcode.arg is not None and not opcode.stack_before:
            stack.append(arg)  # a literal: INT, LONG, FLOAT, the string and bytes opcodes
        else:
            raise UnsafeArtefact(f"{where}: unexpected pickle opcode {op}; refusing it")
    raise ValueError("the pickle has no STOP")


def _skip_array(handle: IO[bytes], state: Any, where: str, found: set[str], budget: list[int]) -> None:
    size, nested, aligned = _array_bytes(state)
    if nested:  # an object array is a whole pickle of its own, scanned the same way
        budget[0] -= 1
        if budget[0] < 0:
            raise UnsafeArtefact(f"{where}: too many nested pickles")
        _scan_stream(handle, where, found, budget)
        return
    if aligned:
        padding = handle.read(1)
        if len(padding) != 1:
            raise ValueError("file ends inside an array")
        handle.seek(padding[0], 1)
    start = handle.tell()
    end = handle.seek(0, 2)
    if start + size > end:
        raise ValueError(f"an array of {size} bytes runs past the end of the file")
    handle.seek(start + size)


def scan_pickle(data: bytes, where: str) -> list[str]:
    """Every global a joblib/pickle file names, all on the allow-list, or UnsafeArtefact.

    Nothing in the file is imported or executed. Compressed joblib files are refused: the
    store writes them uncompressed, and a scan must see the same bytes the loader reads.
    """
    found: set[str] = set()
    if data[:1] != b"\x80":
        raise UnsafeArtefact(f"{where} is not an uncompressed pickle (protocol 2+); refusing it")
    handle = io.BytesIO(data)
    try:
        _scan_stream(handle, where, found, [_MAX_NESTED_PICKLES])
    except UnsafeArtefact:
        raise
    except Exception as exc:  # malformed: the scan cannot vouch for it, so it is not loaded
        raise UnsafeArtefact(f"{where} is not a well-formed joblib pickle ({exc}); refusing it") from None
    if handle.read(1):
        raise UnsafeArtefact(f"{where} has bytes after the end of its pickle; refusing it")
    return sorted(found)


def scan_pickle_file(path: Path) -> list[str]:
    return scan_pickle(Path(path).read_bytes(), str(path))


# ---- the restricted unpickler -----------------------------------------------------------------


class _ArrayWrapper:
    """Stands in for joblib's NumpyArrayWrapper: BUILD gives it a state, then it reads its array."""


def _allowed_object(full: str) -> Any:
    module, _, name = full.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _numpy_function(name: str) -> Any:
    try:
        return _allowed_object(f"numpy._core.multiarray.{name}")
    except ImportError:  # numpy 1.x
        return _allowed_object(f"numpy.core.multiarray.{name}")


def _checked_scalar(dtype: Any, data: Any = None) -> Any:
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.fields is not None:
        raise UnsafeArtefact("a numpy scalar with an object or structured dtype; refusing it")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafeArtefact("a numpy scalar whose bytes do not match its dtype; refusing it")
    return _numpy_function("scalar")(dtype, data)


def _checked_reconstruct(cls: Any, shape: Any, dtype_code: Any) -> Any:
    import numpy as np

    if cls is not np.ndarray or not isinstance(shape, tuple) or not isinstance(dtype_code, bytes):
        raise UnsafeArtefact("a numpy array rebuilt with unexpected arguments; refusing it")
    return _numpy_function("_reconstruct")(cls, shape, dtype_code)


def _checked_slice(*args: Any) -> slice:
    if not 1 <= len(args) <= 3 or not all(a is None or type(a) is int for a in args):
        raise UnsafeArtefact("a slice whose bounds are not integers; refusing it")
    return slice(*args)


def _checked_bit_generator(*args: Any) -> Any:
    from numpy.random import PCG64

    if len(args) != 1 or not (args[0] is PCG64 or type(args[0]) is str and args[0] == "PCG64"):
        raise UnsafeArtefact("a random bit generator other than PCG64; refusing it")
    return PCG64()


def _checked_generator(*args: Any) -> Any:
    import numpy as np

    if len(args) != 1 or type(args[0]) is not np.random.PCG64:  # the 2nd argument would be a callable
        raise UnsafeArtefact("a random generator built other than from a PCG64; refusing it")
    return np.random.Generator(args[0])


def _checked_cython_unpickle(full: str, cls_name: str) -> Callable[..., Any]:
    """Cython's `__pyx_unpickle_X(cls, checksum, state)`, for class X only and no state here
    (a SeedSequence then gets its state by BUILD, checked in load_build; the multinomial loss has none)."""

    def rebuild(*args: Any) -> Any:
        cls = _allowed_object(cls_name)
        if not (len(args) == 3 and args[0] is cls and type(args[1]) is int
                and (args[2] is None or type(args[2]) is tuple and args[2] == ())):
            raise UnsafeArtefact(f"{full} with unexpected arguments; refusing it")
        return _allowed_object(full)(*args)

    return rebuild


_RECONSTRUCTOR_WRAPPERS: dict[str, Callable[..., Any]] = {
    "builtins.slice": _checked_slice,
    "numpy.random._pickle.__generator_ctor": _checked_generator,
    "numpy.random._pickle.__bit_generator_ctor": _checked_bit_generator,
    "numpy.random.bit_generator.__pyx_unpickle_SeedSequence": _checked_cython_unpickle(
        "numpy.random.bit_generator.__pyx_unpickle_SeedSequence", "numpy.random.bit_generator.SeedSequence"),
    "sklearn._loss._loss.__pyx_unpickle_CyHalfMultinomialLoss": _checked_cython_unpickle(
        "sklearn._loss._loss.__pyx_unpickle_CyHalfMultinomialLoss", "sklearn._loss._loss.CyHalfMultinomialLoss"),
}


def _check_random_state(target: Any, state: Any) -> None:
    """PCG64: (its state dict, a SeedSequence); SeedSequence: (entropy, n spawned, pool, pool size, spawn key)."""
    import numpy as np

    full = _full_name(target)
    if full == "numpy.random._pcg64.PCG64":
        ok = (type(state) is tuple and len(state) == 2 and type(state[0]) is dict
              and type(state[1]) is np.random.SeedSequence) or type(state) is dict
    else:
        ok = (type(state) is tuple and len(state) == 5
              and (state[0] is None or type(state[0]) is int or isinstance(state[0], np.integer)
                   or type(state[0]) is np.ndarray and state[0].dtype.kind in "iu")
              and type(state[1]) is int and type(state[2]) is np.ndarray and type(state[3]) is int
              and type(state[4]) is tuple and all(type(k) is int for k in state[4]))
    if not ok:
        raise UnsafeArtefact(f"a {full} with an unexpected state; refusing it")


_PLAIN_BUILD: Callable[[Any], None] = pickle._Unpickler.dispatch[pickle.BUILD[0]]


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's own unpickler, but every global, call and state goes through the allow-list."""

    # The pure-Python unpickler's own state, which typeshed does not declare.
    stack: list[Any]
    append: Callable[[Any], None]
    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, handle: IO[bytes], where: str, depth: int = 0) -> None:
        super().__init__(handle)
        self.handle = handle
        self.where = where
        self.depth = depth
        self._classes: dict[int, str] = {}

    def load_all(self) -> Any:
        value = self.load()
        if self.handle.read(1):
            raise UnsafeArtefact(f"{self.where} has bytes after the end of its pickle; refusing it")
        return value

    def find_class(self, module: str, name: str) -> Any:
        if not is_allowed_global(module, name):
            raise UnsafeArtefact(f"{self.where} would import {module}.{name}, which is not on the allow-list")
        full = f"{module}.{name}"
        if full == _JOBLIB_WRAPPER:
            return _ArrayWrapper
        if full.endswith(".scalar"):
            return _checked_scalar
        if full.endswith("._reconstruct"):
            return _checked_reconstruct
        if full in _RECONSTRUCTOR_WRAPPERS:
            return _RECONSTRUCTOR_WRAPPERS[full]
        return _allowed_object(full)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeArtefact(f"{self.where} uses persistent ids; refusing it")

    def _allowed_callable(self, value: Any, op: str) -> None:
        if op == "REDUCE" and (value is _checked_scalar or value is _checked_reconstruct
                               or any(value is w for w in _RECONSTRUCTOR_WRAPPERS.values())):
            return
        if value is _ArrayWrapper:
            if op == "NEWOBJ":
                return
        elif isinstance(value, type) and f"{value.__module__}.{value.__qualname__}" in ALLOWED_CLASSES:
            return
        raise UnsafeArtefact(f"{self.where}: {op} on {value!r}, which is not an allowed class; refusing it")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        self._allowed_callable(func, "REDUCE")
        if not isinstance(args, tuple):
            raise UnsafeArtefact(f"{self.where}: REDUCE arguments are not a tuple; refusing it")
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._allowed_callable(cls, "NEWOBJ")
        self.append(object.__new__(cls) if cls is _ArrayWrapper else cls.__new__(cls, *args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def _refuse(self) -> None:
        raise UnsafeArtefact(f"{self.where} uses an opcode the model loader does not accept; refusing it")

    for _op in (pickle.NEWOBJ_EX, pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4,
                pickle.NEXT_BUFFER, pickle.READONLY_BUFFER, pickle.PERSID, pickle.BINPERSID):
        dispatch[_op[0]] = _refuse
    del _op

    def load_build(self) -> None:
        import numpy as np

        state = self.stack[-1]
        target = self.stack[-2]
        if isinstance(target, _ArrayWrapper):
            self.stack.pop()
            self.stack[-1] = self._read_array(state)
            return
        allowed = type(target) is np.ndarray or isinstance(target, np.dtype) or (
            f"{type(target).__module__}.{type(target).__qualname__}" in ALLOWED_CLASSES
        )
        if not allowed:
            raise UnsafeArtefact(f"{self.where}: BUILD on a {type(target).__name__}, which is not an allowed class")
        if _full_name(target) in _RANDOM:
            _check_random_state(target, state)
        _PLAIN_BUILD(self)
        if type(target) is np.ndarray and target.dtype.hasobject and not _plain_object_array(target):
            raise UnsafeArtefact(f"{self.where}: an object array holding something other than str, int, float, "
                                 "bool or None, or a structured dtype with an object field; refusing it")

    dispatch[pickle.BUILD[0]] = load_build

    def _read_array(self, state: Any) -> Any:
        import numpy as np

        if type(state) is not dict or set(state) - _WRAPPER_KEYS or not {"shape", "dtype"} <= set(state):
            raise UnsafeArtefact(f"{self.where}: an array wrapper with an unexpected state; refusing it")
        shape, dtype, order = state["shape"], state["dtype"], state.get("order", "C")
        if state.get("subclass", np.ndarray) is not np.ndarray or order not in ("C", "F"):
            raise UnsafeArtefact(f"{self.where}: an array that is not a plain C or F ndarray; refusing it")
        if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
            raise UnsafeArtefact(f"{self.where}: an array shape {shape!r} that is not a tuple of sizes")
        if not isinstance(dtype, np.dtype) or dtype.subdtype is not None or (dtype.fields is not None) != (dtype.kind == "V"):
            raise UnsafeArtefact(f"{self.where}: an array whose dtype is not a plain numpy dtype")
        if dtype.itemsize != np.dtype(dtype.str).itemsize or dtype.kind not in "biufcUSOV" or (
            dtype.kind == "V" and dtype.hasobject
        ):
            raise UnsafeArtefact(f"{self.where}: an array dtype {dtype!r} with a false item size or kind")
        count = 1
        for d in shape:
            count *= d
        if dtype.hasobject:
            if self.depth >= 64:
                raise UnsafeArtefact(f"{self.where}: object arrays nested too deep")
            array = _RestrictedUnpickler(self.handle, self.where, self.depth + 1).load()
            if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
                raise UnsafeArtefact(f"{self.where}: an object array that does not match its wrapper")
            return array  # its items were checked when its own pickle rebuilt it (load_build)
        if state.get("numpy_array_alignment_bytes") is not None:
            padding = self.handle.read(1)
            if len(padding) != 1:
                raise ValueError("file ends inside an array")
            self.handle.read(padding[0])
        size = count * dtype.itemsize
        data = self.handle.read(size)
        if len(data) != size:
            raise ValueError(f"an array of {size} bytes runs past the end of the file")
        array = np.frombuffer(data, dtype=dtype, count=count).copy()
        array = array.reshape(shape[::-1]).transpose() if order == "F" else array.reshape(shape)
        return array.astype(dtype.newbyteorder("=")) if dtype.byteorder not in ("=", "|") else array

