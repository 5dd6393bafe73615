"""The monitoring summary drawn for people: `GET /dashboard` and `serve-app report` both use it.

`render_html` is one self-contained page (key figures, the plots embedded as a PNG, drift
per feature, and for categorical columns their top categories' share in training and in
recent traffic); `render_png` the plots alone: throughput, latency percentiles, class mix,
drift per feature, live accuracy and, for a model with categorical columns, the category
shares of the most drifted one. The summary is what `GET /v2/models/{name}/monitoring`
answers. matplotlib is imported only when a figure is drawn, so a replica that never serves
/dashboard never loads it.
"""

from __future__ import annotations

import base64
import html
import io
import time
from typing import Any, Mapping

STATUS_COLOURS = {"ok": "#2e7d32", "warning": "#f9a825", "drift": "#c62828", "insufficient_data": "#9e9e9e"}


def figure(summary: Mapping[str, Any]) -> Any:
    """One matplotlib Figure with six panels, seven with a categorical column (object API: safe off the main thread)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    drift = summary.get("drift") or {}
    versions = drift.get("versions") or {}
    thresholds = drift.get("thresholds") or {}
    busiest = max(versions.items(), key=lambda item: item[1]["rows"]) if versions else None
    categorical = _most_drifted_categorical(busiest[1]) if busiest else None
    fig = Figure(figsize=(13, 13 if categorical else 10), dpi=100, layout="constrained")
    grid = fig.add_gridspec(4 if categorical else 3, 2)
    series = summary.get("series") or []
    start = series[0]["t"] if series else 0.0
    times = [(point["t"] - start) / 60 for point in series]

    ax = fig.add_subplot(grid[0, 0])
    ax.plot(times, [p["requests_per_s"] for p in series], marker=".", label="requests/s")
    ax.plot(times, [p["errors_per_s"] for p in series], marker=".", color="#c62828", label="errors/s")
    ax.set_title("Throughput")
    ax.set_xlabel("minutes")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)

    ax = fig.add_subplot(grid[0, 1])
    for key, colour in (("p50_ms", "#1565c0"), ("p90_ms", "#ef6c00"), ("p99_ms", "#c62828")):
        ax.plot(times, [p[key] if p[key] is not None else float("nan") for p in series], marker=".", color=colour, label=key.replace("_ms", ""))
    ax.set_title("Latency in the replica (ms)")
    ax.set_xlabel("minutes")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks pile up on a log axis
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3, which="both")

    ax = fig.add_subplot(grid[1, 0])
    classes = summary.get("classes") or {}
    labels = sorted({label for counts in classes.values() for label in counts})
    width = 0.8 / max(1, len(classes))
    for i, (version, counts) in enumerate(sorted(classes.items())):
        total = sum(counts.values()) or 1
        ax.bar([j + i * width for j in range(len(labels))], [counts.get(label, 0) / total for label in labels], width, label=f"v{version}")
    ax.set_xticks([j + width * (len(classes) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_title("Predicted class mix")
    ax.set_ylabel("share of rows")
    if classes:
        ax.legend()

    ax = fig.add_subplot(grid[1, 1])
    if busiest:
        version, scored = busiest
        names = list(scored["features"])
        values = [scored["features"][n]["psi"] for n in names]
        colours = [STATUS_COLOURS[scored["features"][n]["status"]] for n in names]
        # PSI means the same for both kinds (same thresholds); the label says which it is.
        labels = [f"{n} (categories)" if scored["features"][n].get("kind") == "categorical" else n for n in names]
        ax.barh(labels, values, color=colours)
        for level, style in (("psi_warning", ":"), ("psi_drift", "--")):
            if level in thresholds:
                ax.axvline(thresholds[level], color="black", linestyle=style, label=level)
        ax.set_title(f"Drift (PSI) v{version}, {scored['rows']} rows, {scored['replicas']} replica(s): {scored['status']}")
        ax.legend(loc="lower right")
    else:
        ax.set_title("Drift (PSI): no rows yet")
    ax.invert_yaxis()

    ax = fig.add_subplot(grid[2, 0])
    accuracy = (summary.get("accuracy") or {}).get("versions") or {}
    names = [f"v{v}" for v in accuracy]
    ax.bar(names, [a["accuracy"] or 0.0 for a in accuracy.values()], color="#2e7d32")
    for i, a in enumerate(accuracy.values()):
        ax.text(i, (a["accuracy"] or 0) + 0.02, f"{(a['accuracy'] or 0):.3f}\n({a['labelled_rows']} labels)", ha="center")
    ax.set_ylim(0, 1.15)
    ax.set_title("Live accuracy (from /feedback)" + ("" if accuracy else ": no feedback yet"))

    ax = fig.add_subplot(grid[2, 1])
    requests = summary.get("requests") or []
    ax.barh([f"{r['route']} {r['status']}" for r in requests], [r["count"] for r in requests],
            color=["#c62828" if int(r["status"]) >= 400 else "#1565c0" for r in requests])
    ax.set_title("Requests by route and status")
    ax.invert_yaxis()

    if busiest and categorical:
        name, feature = categorical
        bins = [entry for entry in feature["categories"] if entry["training"] or entry["live"]]
        ax = fig.add_subplot(grid[3, :])
        positions = range(len(bins))
        ax.bar([j - 0.2 for j in positions], [entry["training"] for entry in bins], 0.4, color="#9e9e9e", label="training")
        ax.bar([j + 0.2 for j in positions], [entry["live"] for entry in bins], 0.4,
               color=STATUS_COLOURS[feature["status"]], label="recent traffic")
        ax.set_xticks(list(positions), [entry["category"] for entry in bins])
        ax.set_ylabel("share of rows")
        ax.set_title(f"Categorical column {name!r} (v{busiest[0]}, PSI {feature['psi']:.2f}, {feature['status']}): "
                     "share of each category")
        ax.legend()
    return fig


def _most_drifted_categorical(scored: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """The categorical column with the highest PSI, whose category shares get a panel of their own."""
    columns = [(name, f) for name, f in (scored.get("features") or {}).items()
               if f.get("kind") == "categorical" and f.get("categories") and f.get("psi") is not None]
    return max(columns, key=lambda item: item[1]["psi"]) if columns else None


def render_png(summary: Mapping[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure(summary)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def render_html(summary: Mapping[str, Any], source: str = "") -> str:
    png = base64.b64encode(render_png(summary)).decode("ascii")
    latency = summary.get("latency_ms") or {}
    drift = summary.get("drift") or {}
    typed = any("kind" in f for scored in (drift.get("versions") or {}).values() for f in scored["features"].values())
    rows, category_rows = [], []
    for version, scored in sorted((drift.get("versions") or {}).items()):
        for feature, f in scored["features"].items():
            colour = STATUS_COLOURS[f["status"]]
            ks = f"{f['ks']:.4f}" if "ks" in f else "-"
            extra = (
                f"<td>{html.escape(f.get('kind', ''))}</td><td>{_share(f.get('unseen_share'))}</td><td>{_share(f.get('null_share'))}</td>"
                if typed else ""
            )
            rows.append(
                f"<tr><td>v{html.escape(version)}</td><td>{html.escape(feature)}</td><td>{f['psi']:.4f}</td>"
                f"<td>{ks}</td>{extra}<td style='color:{colour};font-weight:bold'>{f['status']}</td></tr>"
            )
            category_rows.extend(_category_rows(version, feature, f))
    header = "<th>kind</th><th>unseen</th><th>nulls</th>" if typed else ""
    width = 8 if typed else 5
    categories = (
        "<h2>Categorical columns: training vs recent share</h2>\n<table><tr><th>version</th><th>column</th><th>category</th>"
        f"<th>training</th><th>recent</th><th></th></tr>{''.join(category_rows)}</table>"
        if category_rows else ""
    )
    series = summary.get("series") or []
    recent = series[-1]["requests_per_s"] if series else 0.0

    def ms(value: Any) -> str:
        return "-" if value is None else f"{value:.2f} ms"

    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary.get("generated_at", time.time())))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>serve_app: {html.escape(str(summary.get('model')))}</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} img{{max-width:100%;height:auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}} .kpi{{display:inline-block;margin-right:32px;font-size:18px}}</style>
</head><body>
<h1>serve_app monitoring: {html.escape(str(summary.get('model')))} ({html.escape(str(summary.get('app')))})</h1>
<p>{html.escape(source)} &middot; generated {generated} &middot; {summary.get('replicas_reporting', 0)} replica(s) reporting</p>
<div><span class="kpi">last {summary.get('bucket_s', 0):.0f} s: <b>{recent:.1f} req/s</b></span>
<span class="kpi">p50 <b>{ms(latency.get('p50'))}</b></span><span class="kpi">p90 <b>{ms(latency.get('p90'))}</b></span>
<span class="kpi">p99 <b>{ms(latency.get('p99'))}</b></span>
<span class="kpi">drift: <b style="color:{STATUS_COLOURS.get(drift.get('status', 'ok'), '#222')}">{drift.get('status', '-')}</b></span></div>
<img alt="throughput, latency, class mix, drift, accuracy" src="data:image/png;base64,{png}">
<h2>Drift per feature</h2>
<table><tr><th>version</th><th>feature</th><th>PSI</th><th>KS</th>{header}<th>status</th></tr>{''.join(rows) or f'<tr><td colspan={width}>no rows yet</td></tr>'}</table>
{categories}
</body></html>
"""


def _share(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _category_rows(version: str, feature: str, scored: Mapping[str, Any]) -> list[str]:
    """One row per bin of a categorical column, with the two shares drawn as bars."""
    rows = []
    for entry in scored.get("categories") or ():
        if not entry["training"] and not entry["live"]:
            continue  # an empty "other" or "unseen" bin says nothing
        bars = "".join(
            f"<div style='background:{colour};height:6px;width:{200 * entry[key]:.0f}px;margin:1px 0'></div>"
            for key, colour in (("training", "#9e9e9e"), ("live", "#1565c0"))
        )
        rows.append(
            f"<tr><td>v{html.escape(version)}</td><td>{html.escape(feature)}</td><td>{html.escape(entry['category'])}</td>"
            f"<td>{_share(entry['training'])}</td><td>{_share(entry['live'])}</td><td>{bars}</td></tr>"
        )
    return rows
