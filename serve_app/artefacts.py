"""Writing and reading model files, in the safe skops format or in joblib (pickle).

A joblib file can run arbitrary code when it is unpickled, so it is only opened after the
store has checked its sha256 against the manifest. A skops file is read without running
code, and only types from an allow-list of libraries are rebuilt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from serve_app.errors import ModelLoadError

ModelFormat = Literal["skops", "joblib"]
FORMATS: tuple[ModelFormat, ...] = ("skops", "joblib")
# Types from these packages may be rebuilt from a skops file; anything else is refused.
TRUSTED_MODULE_PREFIXES = ("sklearn.", "numpy.", "scipy.", "builtins.", "collections.")


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

    return [t for t in skops.io.get_untrusted_types(file=path) if not t.startswith(TRUSTED_MODULE_PREFIXES)]


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
        import joblib

        try:
            return joblib.load(path)
        except Exception as exc:
            raise ModelLoadError(f"cannot read joblib file {path}: {exc}") from exc
    raise ModelLoadError(f"unknown model format {fmt!r}; use one of {', '.join(FORMATS)}")
