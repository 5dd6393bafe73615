"""Writing and reading model files, in the safe skops format or in joblib (pickle).

A joblib file can run arbitrary code when it is unpickled, so it is only opened after the
store has checked its sha256 against the manifest, and then only if a static scan of its
pickle opcodes finds no global outside an allow-list (sklearn, numpy, scipy, joblib's array
wrapper, a few builtins); the unpickler enforces the same list again while loading. A
matching hash proves the file is the one that was stored, not that it is harmless. A skops
file is read without running code, and only types from the same allow-list are rebuilt.
"""

from __future__ import annotations

import pickletools
import re
from pathlib import Path
from typing import IO, Any, Literal

from serve_app.errors import ModelLoadError

ModelFormat = Literal["skops", "joblib"]
FORMATS: tuple[ModelFormat, ...] = ("skops", "joblib")
# Types and functions from these packages may be rebuilt from a model file (skops or
# joblib); anything else is refused. builtins only by exact name: a prefix would admit
# eval/exec/getattr, which a FunctionTransformer could then call at predict time.
TRUSTED_MODULE_PREFIXES = ("sklearn.", "numpy.", "scipy.")
TRUSTED_GLOBALS = frozenset(
    {
        "builtins.bool", "builtins.bytearray", "builtins.bytes", "builtins.complex", "builtins.dict",
        "builtins.float", "builtins.frozenset", "builtins.int", "builtins.list", "builtins.object",
        "builtins.set", "builtins.slice", "builtins.str", "builtins.tuple", "builtins.type",
        "collections.OrderedDict", "collections.defaultdict", "copyreg._reconstructor",
        "_codecs.encode",  # how protocol 2 stores bytes
        "joblib.numpy_pickle.NumpyArrayWrapper",
    }
)
# Inside the trusted packages, what reads files, runs code or builds code is still refused.
_UNTRUSTED_PARTS = frozenset({"f2py", "distutils", "testing", "_testing", "ctypeslib", "_pytesttester", "conftest"})
_UNTRUSTED_NAMES = frozenset(
    {"load", "loads", "fromfile", "tofile", "save", "savez", "memmap", "open", "system", "exec", "eval",
     "compile", "getattr", "setattr", "delattr", "__import__", "import_module", "loadtxt", "genfromtxt"}
)


def is_trusted_global(module: str, name: str) -> bool:
    full = f"{module}.{name}"
    if full in TRUSTED_GLOBALS:
        return True
    if not full.startswith(TRUSTED_MODULE_PREFIXES):
        return False
    parts = set(module.split(".")) | set(name.split("."))
    return not (parts & _UNTRUSTED_PARTS or parts & _UNTRUSTED_NAMES)


class UnsafeArtefact(ModelLoadError):
    """A model file that would import or call something outside the allow-list."""


def dump(model: Any, path: Path, fmt: ModelFormat) -> None:
    if fmt == "skops":
        import skops.io

        skops.io.dump(model, path)
    elif fmt == "joblib":
        import joblib

        joblib.dump(model, path)
    else:
        raise ValueError(f"unknown model format {fmt!r}; use one of {', '.join(FORMATS)}")


def untrusted_types(path: Path) -> list[str]:
    import skops.io

    return [t for t in skops.io.get_untrusted_types(file=path) if not is_trusted_global(*_split_type(t))]


def _split_type(full: str) -> tuple[str, str]:
    module, _, name = full.rpartition(".")
    return module, name


def load(path: Path, fmt: ModelFormat) -> Any:
    """Reads a model file whose hash the caller has already verified."""
    if fmt == "skops":
        import skops.io

        try:
            refused = untrusted_types(path)
            if refused:
                raise ModelLoadError(
                    f"{path} contains types outside the allow-list ({', '.join(refused)}); "
                    "only scikit-learn, numpy and scipy objects are loaded from skops files"
                )
            trusted = skops.io.get_untrusted_types(file=path)
            return skops.io.load(path, trusted=trusted)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot read skops file {path}: {exc}") from exc
    if fmt == "joblib":
        scan_pickle_file(path)  # raises before a single opcode is executed
        try:
            return _load_joblib_restricted(path)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot read joblib file {path}: {exc}") from exc
    raise ModelLoadError(f"unknown model format {fmt!r}; use one of {', '.join(FORMATS)}")


# ---- static scan of joblib/pickle files ------------------------------------------------------
#
# A small symbolic pickle machine: it walks the opcodes, keeps literals, tuples, lists, dicts
# and the memo, and stands in a placeholder for every object that would be built, so nothing
# is imported or called. Every GLOBAL/STACK_GLOBAL/INST is checked against the allow-list.
# joblib writes each numpy array's raw bytes straight after the array wrapper's BUILD
# opcode; the scan reads the wrapper's shape and dtype from the symbolic state and skips
# exactly those bytes, as joblib's reader does, so it stays in step with the real load.

_DTYPE_NAME = re.compile(r"^[<>|=]?[a-zA-Z]\d*$")
_MAX_NESTED_PICKLES = 10_000
_REFUSED_OPCODES = {
    "PERSID": "persistent ids", "BINPERSID": "persistent ids",
    "EXT1": "the copyreg extension registry", "EXT2": "the copyreg extension registry",
    "EXT4": "the copyreg extension registry",
    "NEXT_BUFFER": "out-of-band buffers", "READONLY_BUFFER": "out-of-band buffers",
}


class _Mark:
    pass


_MARK = _Mark()


class _Global:
    def __init__(self, module: str, name: str) -> None:
        self.full = f"{module}.{name}"


class _Built:
    """An object the real unpickler would create (by a call, NEWOBJ or INST)."""

    def __init__(self, factory: Any, args: Any) -> None:
        self.factory = factory
        self.args = args
        self.state: Any = None


def _factory_name(value: Any) -> str | None:
    return value.full if isinstance(value, _Global) else None


def _pop_mark(stack: list[Any]) -> list[Any]:
    for index in range(len(stack) - 1, -1, -1):
        if stack[index] is _MARK:
            items = stack[index + 1 :]
            del stack[index:]
            return items
    raise ValueError("MARK expected on the stack")


def _array_bytes(state: Any) -> tuple[int, bool, bool]:
    """(data bytes, nested pickle?, alignment byte?) of one joblib NumpyArrayWrapper."""
    if not isinstance(state, dict):
        raise ValueError("array wrapper without a state dict")
    shape, dtype = state.get("shape"), state.get("dtype")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"array wrapper shape {shape!r} is not a tuple of sizes")
    if not (isinstance(dtype, _Built) and _factory_name(dtype.factory) == "numpy.dtype"):
        raise ValueError("array wrapper dtype is not a numpy.dtype")
    args, dstate = dtype.args, dtype.state
    if not (isinstance(args, tuple) and args and isinstance(args[0], str) and _DTYPE_NAME.match(args[0])):
        raise ValueError(f"array wrapper dtype {args!r} is not a plain dtype name")
    import numpy as np

    itemsize = np.dtype(args[0]).itemsize
    has_object = args[0].lstrip("<>|=").startswith("O")
    if isinstance(dstate, tuple) and len(dstate) >= 8:
        if type(dstate[5]) is int and dstate[5] > 0:
            itemsize = dstate[5]  # structured and unicode dtypes keep their size here
        has_object = has_object or (type(dstate[7]) is int and bool(dstate[7] & 1))
    count = 1
    for d in shape:
        count *= d
    aligned = state.get("numpy_array_alignment_bytes") is not None
    return count * itemsize, has_object, aligned


def _scan_stream(handle: IO[bytes], where: str, found: set[str], budget: list[int]) -> None:
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def check(module: Any, name: Any) -> _Global:
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafeArtefact(f"{where}: a global whose name is computed; refusing it")
        found.add(f"{module}.{name}")
        if not is_trusted_global(module, name):
            raise UnsafeArtefact(
                f"{where} would import {module}.{name}, which is not on the allow-list "
                "(scikit-learn, numpy, scipy); the file was not unpickled"
            )
        return _Global(module, name)

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
        elif op in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            target = check(module, name)
            if op == "GLOBAL":
                stack.append(target)
            else:
                stack.append(_Built(target, tuple(_pop_mark(stack))))
        elif op == "STACK_GLOBAL":
            name = stack.pop()
            stack.append(check(stack.pop(), name))
        elif op == "OBJ":
            items = _pop_mark(stack)
            stack.append(_Built(items[0] if items else None, tuple(items[1:])))
        elif op in ("REDUCE", "NEWOBJ"):
            args = stack.pop()
            stack.append(_Built(stack.pop(), args))
        elif op == "NEWOBJ_EX":
            stack.pop()
            args = stack.pop()
            stack.append(_Built(stack.pop(), args))
        elif op == "BUILD":
            state = stack.pop()
            target = stack[-1]
            if isinstance(target, _Built):
                target.state = state
                if _factory_name(target.factory) == "joblib.numpy_pickle.NumpyArrayWrapper":
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
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
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
            stack.append({})
        elif op in ("DICT", "SETITEMS", "SETITEM"):
            items = _pop_mark(stack) if op != "SETITEM" else stack[-2:]
            if op == "SETITEM":
                del stack[-2:]
            target = {} if op == "DICT" else stack[-1]
            if isinstance(target, dict):
                for key, value in zip(items[::2], items[1::2]):
                    if isinstance(key, (str, int, float, bytes, tuple, type(None))):
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
            memo[int(arg)] = stack[-1]
        elif op == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif op in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[int(arg)])
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


def scan_pickle_file(path: Path) -> list[str]:
    """Every global a joblib/pickle file names, all on the allow-list, or UnsafeArtefact.

    Nothing in the file is imported or executed. Compressed joblib files are refused: the
    store writes them uncompressed, and a scan must see the same bytes the loader reads.
    """
    found: set[str] = set()
    with open(path, "rb") as handle:
        if handle.read(1) != b"\x80":
            raise UnsafeArtefact(f"{path} is not an uncompressed pickle (protocol 2+); refusing it")
        handle.seek(0)
        try:
            _scan_stream(handle, str(path), found, [_MAX_NESTED_PICKLES])
        except UnsafeArtefact:
            raise
        except Exception as exc:  # malformed: the scan cannot vouch for it, so it is not loaded
            raise UnsafeArtefact(f"{path} is not a well-formed joblib pickle ({exc}); refusing it") from None
        if handle.read(1):
            raise UnsafeArtefact(f"{path} has bytes after the end of its pickle; refusing it")
    return sorted(found)


def _load_joblib_restricted(path: Path) -> Any:
    """joblib's own reader, with the allow-list enforced again on every global it resolves."""
    from joblib.numpy_pickle import NumpyUnpickler

    class AllowListUnpickler(NumpyUnpickler):  # type: ignore[misc]
        def find_class(self, module: str, name: str) -> Any:
            if not is_trusted_global(module, name):
                raise UnsafeArtefact(f"{path} would import {module}.{name}, which is not on the allow-list")
            return super().find_class(module, name)

    with open(path, "rb") as handle:
        return AllowListUnpickler(str(path), handle, ensure_native_byte_order=True).load()
