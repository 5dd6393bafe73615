"""Calling the served model from Python in the cluster, through a Ray Serve handle (no HTTP).

    import ray
    from serve_app.client import model_handle

    ray.init(address="auto")                    # attach to the running cluster
    handle = model_handle()                     # the "serve_app" application
    handle.predict.remote([[5.1, 3.5, 1.4, 0.2]]).result()         # array([0])
    handle.predict_proba.remote(rows).result()                     # (n, classes) array
    handle.infer.remote(rows, ["predict"], "2").result().outputs   # a given version

Inside async code, `await handle.predict.remote(rows)` works the same.
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.handle import DeploymentHandle

DEFAULT_APP_NAME = "serve_app"


def model_handle(app_name: str = DEFAULT_APP_NAME) -> DeploymentHandle:
    """The application's handle, usable from plain synchronous code too.

    Ray Serve's throughput-optimized mode runs a handle's router on the caller's event
    loop, which a plain script does not have; such a handle is given its own loop.
    """
    handle = serve.get_app_handle(app_name)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        # Private Ray API (2.60): the public switch is the process-wide environment
        # variable RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1, read when ray.serve is imported.
        handle._init(_run_router_in_separate_loop=True)
    return handle
