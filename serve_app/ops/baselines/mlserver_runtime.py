"""MLServer's scikit-learn runtime with adaptive batching on, as MLServer's docs configure it.

MLServer's dependencies conflict with Ray's, so it lives in a virtualenv of its own, made
once (`python -m venv` + `pip install`) in a cache directory and reused by later runs:
`$SERVE_APP_MLSERVER_VENV`, else `$XDG_CACHE_HOME/serve_app/mlserver-venv` (~/.cache). It
gets the same scikit-learn and numpy versions as this environment, so the joblib file it
loads is the very estimator the other servers load from the store.

A model repository for one model (`write_repository`):

    settings.json                 ports, debug off (no access log), metrics under the run's dir
    <name>/model-settings.json    implementation mlserver_sklearn.SKLearnModel, parameters.uri,
                                  max_batch_size / max_batch_time: adaptive batching
    <name>/model.joblib           the estimator, joblib.dump'ed

and the server is `<venv>/bin/mlserver start <repository>`. When MLServer cannot be
installed, `Unavailable` says why and the bench reports it instead of failing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

# uvloop 0.22 made asyncio.get_event_loop() raise without a running loop, which MLServer
# 1.7.1's inference-pool workers call at start: with it, every model fails to load.
MLSERVER_PACKAGES = ("mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop<0.22")
# Adaptive batching (docs: user-guide/adaptive-batching): up to this many requests merged
# into one predict call, waiting at most this long for them. MLServer leaves it off by
# default; these are the values of issue 17's first look (64 requests, 2 ms).
MAX_BATCH_SIZE = 64
MAX_BATCH_TIME_S = 0.002
INSTALL_TIMEOUT_S = 1200.0
MARKER = ".serve_app-requirements"  # what the venv was installed with


class Unavailable(RuntimeError):
    """MLServer could not be installed or started; the message says why."""


def venv_dir() -> Path:
    override = os.environ.get("SERVE_APP_MLSERVER_VENV")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "serve_app" / "mlserver-venv"


def requirements() -> list[str]:
    import numpy
    import sklearn

    return [*MLSERVER_PACKAGES, f"scikit-learn=={sklearn.__version__}", f"numpy=={numpy.__version__}"]


def ensure_installed(venv: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The `mlserver` executable of a venv holding `requirements()`: made (or completed) now
    if it is not there yet. Raises Unavailable with pip's last lines when that fails."""
    venv = venv or venv_dir()
    wanted = "\n".join(requirements())
    exe = venv / "bin" / "mlserver"
    marker = venv / MARKER
    if exe.is_file() and marker.is_file() and marker.read_text() == wanted:
        return exe
    log(f"installing MLServer into its own venv {venv} (once; its dependencies conflict with Ray's)")
    try:
        if not (venv / "bin" / "python").is_file():
            venv.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True,
                           timeout=300)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *requirements()], check=True, capture_output=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise Unavailable(f"pip install {' '.join(requirements())} failed: {' / '.join(tail)}") from None
    except (subprocess.TimeoutExpired, OSError) as exc:
        raise Unavailable(f"installing MLServer failed: {exc}") from None
    if not exe.is_file():
        raise Unavailable(f"pip installed MLServer but {exe} is missing")
    marker.write_text(wanted)
    return exe


def version(exe: Path) -> str:
    done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    return (done.stdout or done.stderr).strip().splitlines()[-1] if done.returncode == 0 else "unknown"


def write_repository(root: Path, name: str, estimator: Any, ports: dict[str, int]) -> None:
    """The repository MLServer serves: settings.json and one model, with adaptive batching."""
    import joblib

    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, model_dir / "model.joblib")
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": name,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"},
        "max_batch_size": MAX_BATCH_SIZE,
        "max_batch_time": MAX_BATCH_TIME_S,
    }, indent=2))
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1",
        "http_port": ports["http"],
        "grpc_port": ports["grpc"],
        "metrics_port": ports["metrics"],
        "metrics_dir": str(root / ".metrics"),
        "debug": False,  # no access log: serve_app and the Starlette baseline run without one
    }, indent=2))


def command(exe: Path, root: Path) -> list[str]:
    return [str(exe), "start", str(root)]


def environment() -> dict[str, str]:
    """Its own venv only: none of this process's PYTHONPATH (serve_app, Ray) leaks into it."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
