"""`serve-app report`: the monitoring state of a running app as one HTML page.

    serve-app report --url http://127.0.0.1:8000 --out report.html
    serve-app report --url http://127.0.0.1:8000 --png report.png   # the plots only

It reads `GET /v2/models/{name}/monitoring` (the same data `GET /dashboard` renders) and
writes it drawn by serve_app/monitoring/dashboard.py: throughput, latency percentiles,
class mix, drift per feature (for categorical columns also the unseen share and the top
categories' training vs recent share) and live accuracy, embedded as PNGs so the page is
one self-contained file.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from serve_app.monitoring.dashboard import render_html, render_png


def fetch_summary(url: str, model: str = "iris", api_key: str | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
    """The app's monitoring summary, as `GET /v2/models/{model}/monitoring` answers it."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"{url.rstrip('/')}/v2/models/{model}/monitoring", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        return dict(json.loads(answer.read()))


def write_pages(summary: dict[str, Any], out: Path, png: Path | None = None, source: str = "") -> list[Path]:
    """Writes the HTML page to `out` (and the plots alone to `png`); returns the files written."""
    written = []
    if png is not None:
        png.write_bytes(render_png(summary))
        written.append(png)
    out.write_text(render_html(summary, source))
    written.append(out)
    return written
