"""Calling the served model from Python in the cluster, through a Ray Serve handle (no HTTP).

    import ray
    from serve_app.client import model_handle

    ray.init(address="auto")                    # attach to the running cluster
    handle = model_handle()                     # the "serve_app" application
    handle.predict.remote([[5.1, 3.5, 1.4, 0.2]]).result()         # array([0])
    handle.predict_proba.remote(rows).result()                     # (n, classes) array
    handle.predict.remote(rows, "2").result()                      # a given version
    list(predict_iter(handle, endless_rows))                       # any iterable, lazily

Inside async code, `await handle.predict.remote(rows)` works the same. Ray is imported only
when a handle is asked for, so the V2 client codec (`serve_app.client.v2`) needs only numpy.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from serve_app.client.streaming import predict_iter

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

__all__ = ["DEFAULT_APP_NAME", "model_handle", "predict_iter"]
DEFAULT_APP_NAME = "serve_app"


def model_handle(app_name: str = DEFAULT_APP_NAME) -> "DeploymentHandle":
    """The application's handle, usable from plain synchronous code too.

    Ray Serve's throughput-optimized mode runs a handle's router on the caller's event
    loop, which a plain script does not have; such a handle is given its own loop.
    """
    from ray import serve

    handle = serve.get_app_handle(app_name)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        # Private Ray API (2.60): the public switch is the process-wide environment
        # variable RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1, read when ray.serve is imported.
        handle._init(_run_router_in_separate_loop=True)
    return handle
