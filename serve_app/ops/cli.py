"""`serve-app`: train, manage and serve models (also `python -m serve_app`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from serve_app.ops import processes
from serve_app.errors import ServeAppError
from serve_app.ops.control import DeployFailed
from serve_app.settings import default_store
from serve_app.model.schema import UnservableModel
from serve_app.model.manifest import Manifest
from serve_app.model.store import DEFAULT_ALIAS, ModelStore


def _store(args: argparse.Namespace) -> ModelStore:
    return ModelStore(args.store)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from serve_app.model.training import CHURN_DATASET, CHURN_MODEL_NAME, DEFAULT_MODEL_NAME, train, train_churn

    if args.dataset == CHURN_DATASET:
        if args.estimator is not None or args.format != "skops":
            raise ValueError("the churn dataset trains its own Pipeline, stored as skops: drop --estimator and --format")
        try:
            manifest = train_churn(_store(args), name=args.name or CHURN_MODEL_NAME, seed=args.seed, progress=_say)
        except UnservableModel as exc:
            return _refused(args.name or CHURN_MODEL_NAME, exc)
    else:
        manifest = train(
            _store(args), name=args.name or DEFAULT_MODEL_NAME, dataset=args.dataset, estimator=args.estimator,
            fmt=args.format, seed=args.seed, progress=_say,
        )
    _print_stored(_store(args), manifest)
    return 0


def _print_stored(store: ModelStore, manifest: Manifest) -> None:
    """What `train` and `models import` stored: version, aliases, path, runtime, and the
    columns when the model has typed ones."""
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in manifest.metrics.items())
    aliases = [a for a, v in store.aliases(manifest.name).items() if v == manifest.version]
    print(
        f"stored {manifest.name} v{manifest.version} ({manifest.estimator.rsplit('.', 1)[-1]} on "
        f"{manifest.dataset}, {manifest.format}; {metrics or 'no test set'}) aliases: {', '.join(aliases)}"
    )
    print(f"  {store.version_dir(manifest.name, manifest.version)}")
    served_by = "ONNX Runtime (compiled model.onnx)" if manifest.runtime == "onnxruntime" else "scikit-learn"
    print(f"  runtime: {served_by}; {manifest.runtime_reason}")
    if manifest.input_schema is not None:
        rows = [["COLUMN", "KIND", "NULLABLE", "CATEGORIES"]]
        for column in manifest.input_schema.columns:
            categories = "-"
            if column.categories is not None:
                categories = f"{len(column.categories)}, unknown {column.unknown_categories}"
            rows.append([column.name, column.kind, "yes" if column.nullable else "no", categories])
        print("  " + _table(rows).replace("\n", "\n  "))


PICKLE_WARNING = (
    "{file} is a pickle (joblib) file, and loading a pickle runs whatever code it holds. Load only files "
    "you made yourself; then pass --trust-pickle. It is loaded once, on this machine: the stored version is "
    "in the safe, signed skops format, and servers never unpickle."
)


def cmd_models_import(args: argparse.Namespace) -> int:
    """Publishes a model the user fitted and saved with joblib.dump (serve_app/model/publish.py)."""
    if not args.trust_pickle:
        print("serve-app: error: " + PICKLE_WARNING.format(file=args.model_file), file=sys.stderr)
        return 2
    import joblib

    from serve_app.model.publish import publish

    _store(args).check_name(args.name)  # before the file is unpickled, not after
    try:
        estimator = joblib.load(args.model_file)
    except FileNotFoundError:
        raise ValueError(f"no such file: {args.model_file}") from None
    except Exception as exc:  # unpickling runs the file's code: anything can fail
        raise ValueError(f"cannot load {args.model_file}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    try:
        manifest = publish(
            estimator, name=args.name, sample=args.sample, target=args.target, test=args.test,
            store=_store(args), progress=_say,
        )
    except UnservableModel as exc:
        return _refused(args.name, exc)
    _print_stored(_store(args), manifest)
    return 0


def _refused(name: str, exc: UnservableModel) -> int:
    reasons = "".join(f"\n  - {reason}" for reason in exc.reasons)
    print(f"serve-app: error: cannot publish {name}:{reasons}", file=sys.stderr)
    return 1


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def traffic_shares(user_config: dict[str, Any], resolve: Callable[[str], str]) -> dict[str, str]:
    """What each version gets under a deployment's user_config, e.g. {"1": "90%", "2": "10%"}."""
    default = resolve(str(user_config.get("version", DEFAULT_ALIAS)))
    shares = {default: "100%"}
    canary = user_config.get("canary") or {}
    if canary.get("weight"):
        candidate = resolve(str(canary["version"]))
        shares = {default: f"{1 - canary['weight']:.0%}", candidate: f"{canary['weight']:.0%}"}
    shadow = user_config.get("shadow") or {}
    if shadow.get("version"):
        mirrored = resolve(str(shadow["version"]))
        shares[mirrored] = (shares.get(mirrored, "") + f" shadow {shadow.get('fraction', 1.0):.0%}").strip()
    return shares


def _live_traffic(args: argparse.Namespace, store: ModelStore) -> tuple[str | None, dict[str, str]]:
    """The running app's model name and traffic shares by version, if a cluster answers."""
    if not getattr(args, "address", None):
        return None, {}
    from serve_app.ops import rollout

    target = _target(args)
    name = rollout.model_name(target)
    return name, traffic_shares(rollout.current_user_config(target), lambda ref: store.resolve(name, ref))


def cmd_models_list(args: argparse.Namespace) -> int:
    store = _store(args)
    live_model, shares = _live_traffic(args, store)
    entries: list[dict[str, Any]] = []
    for name in store.names():
        aliases = store.aliases(name)
        for version in store.versions(name):
            manifest = store.manifest(name, version)
            traffic = {"traffic": shares.get(version, "") if name == live_model else ""} if live_model else {}
            entries.append({
                **traffic,
                "name": name,
                "version": version,
                "aliases": sorted(a for a, v in aliases.items() if v == version),
                "estimator": manifest.estimator.rsplit(".", 1)[-1],
                "dataset": manifest.dataset,
                "format": manifest.format,
                "metrics": manifest.metrics,
                "created_at": manifest.created_at,
            })
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print(f"no models in {store.root}; train one with: serve-app train --store {store.root}")
        return 0
    live = live_model is not None  # the TRAFFIC column only when a running app was asked
    rows = [["NAME", "VERSION", "ALIASES", *(["TRAFFIC"] if live else []), "ESTIMATOR", "DATASET", "FORMAT", "METRICS", "CREATED"]]
    for e in entries:
        metrics = " ".join(f"{k}={v:.3f}" for k, v in e["metrics"].items())
        traffic_cell = [e["traffic"]] if live else []
        rows.append([e["name"], e["version"], ",".join(e["aliases"]), *traffic_cell, e["estimator"], e["dataset"], e["format"], metrics, e["created_at"]])
    print(_table(rows))
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    manifest = _store(args).manifest(args.name, args.ref)
    print(json.dumps(manifest.model_dump(mode="json"), indent=2))
    return 0


def _target(args: argparse.Namespace) -> Any:
    from serve_app.ops.rollout import Target

    return Target(address=args.address, app=args.app, url=args.url)


def _cluster_reachable(args: argparse.Namespace) -> bool:
    from serve_app.ops import control

    try:
        control.details(args.address)
        return True
    except Exception:
        return False


def _verified_version(store: ModelStore, name: str, ref: str) -> str:
    """Resolves `ref` and loads it here first, so a broken version is refused before any change."""
    from serve_app.model.predictor import Predictor

    predictor = Predictor.load(store, name, ref)
    predictor.check_health()
    return predictor.version


def _go_live(args: argparse.Namespace, name: str, version: str, action: Callable[[], Any]) -> int:
    """Applies a change to the running app, or says why it was not applied."""
    from serve_app.ops import rollout

    if args.store_only:
        return 0
    if not _cluster_reachable(args):
        print(f"  no running cluster at {args.address or 'the default dashboard address'}: only the store changed; "
              "the next deploy serves it (pass --address http://HEAD:8265 to update a running app)")
        return 0
    served_model = rollout.model_name(_target(args))
    if served_model != name:
        print(f"  the running app {args.app!r} serves {served_model!r}, not {name!r}: only the store changed")
        return 0
    try:
        replicas = action()
    except rollout.RolloutRefused as exc:
        print(f"serve-app: error: refused, nothing changed for clients: {exc}", file=sys.stderr)
        return 3
    print(f"  live: {len(replicas)} replica(s) switched without a restart: {next(iter(replicas.values()))['routing']}")
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    from serve_app.ops import rollout

    store = _store(args)
    version = _verified_version(store, args.name, args.ref)
    before = store.aliases(args.name).get(args.alias)
    code = _go_live(args, args.name, version, lambda: rollout.serve_version(version, _target(args)))
    if code:
        return code
    store.promote(args.name, version, args.alias, reason=args.reason or "")
    print(f"{args.name}: {args.alias} -> v{version} (was {('v' + before) if before else 'unset'})")
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from serve_app.ops import rollout

    store = _store(args)
    before = store.aliases(args.name).get(args.alias)
    previous = store.previous_version(args.name, args.alias)
    version = _verified_version(store, args.name, previous)
    code = _go_live(args, args.name, version, lambda: rollout.serve_version(version, _target(args)))
    if code:
        return code
    store.promote(args.name, version, args.alias, reason="rollback")
    print(f"{args.name}: {args.alias} rolled back v{before} -> v{version}")
    return 0


def cmd_models_canary(args: argparse.Namespace) -> int:
    from serve_app.ops import rollout

    store = _store(args)
    version = _verified_version(store, args.name, args.ref)
    code = _go_live(args, args.name, version, lambda: rollout.set_canary(version, args.weight, args.sticky_header, _target(args)))
    if code == 0:
        store.log_event(args.name, {"action": "canary", "version": version, "weight": args.weight, "sticky_header": args.sticky_header})
        print(f"{args.name}: canary v{version} at weight {args.weight}" + (" (ended)" if args.weight == 0 else ""))
    return code


def cmd_models_shadow(args: argparse.Namespace) -> int:
    from serve_app.ops import rollout

    store = _store(args)
    version = None if args.off else _verified_version(store, args.name, args.ref)
    code = _go_live(args, args.name, version or "", lambda: rollout.set_shadow(version, args.fraction, _target(args)))
    if code == 0:
        store.log_event(args.name, {"action": "shadow", "version": version, "fraction": args.fraction})
        print(f"{args.name}: " + (f"shadow v{version} on {args.fraction:.0%} of traffic" if version else "shadow off"))
    return code


def cmd_models_status(args: argparse.Namespace) -> int:
    from serve_app.ops import control

    # One look: each RUNNING replica asked until it has answered (or 10 polls per replica).
    view = control.watch_replicas(lambda view: True, args.address, args.app, url=args.url)
    replicas = sum(1 for state in view.states.values() if state == "RUNNING")
    print(json.dumps({"replicas_running": replicas, "replicas": list(view.statuses.values())}, indent=2))
    return 0


def cmd_models_history(args: argparse.Namespace) -> int:
    for entry in _store(args).history(args.name):
        print(json.dumps(entry, sort_keys=True))
    return 0


def cmd_models_sign(args: argparse.Namespace) -> int:
    """Signs versions as their publisher, after checking them (nothing is unpickled)."""
    store = _store(args)
    refs = store.versions(args.name) if args.ref == "all" else [args.ref]
    for ref in refs:
        version = store.sign_version(args.name, ref)
        print(f"signed {args.name} v{version}")
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    from serve_app.model import signing

    key = signing.local_signer(create=not args.no_create).public_key()
    public = signing.signing_dir() / signing.PUBLIC_KEY_FILENAME
    print(f"key id: {signing.key_id(key)}\npublic key: {public}\n{public.read_text().strip()}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """A new key pair, then every version that verifies under the old key re-signed with it."""
    from serve_app.model import signing

    store = _store(args)
    public = signing.signing_dir() / signing.PUBLIC_KEY_FILENAME
    old_keys = signing.trusted_keys([str(public)]) if public.exists() else {}
    old_id, new_id = signing.rotate()
    print(f"new key {new_id}" + (f" (the old key {old_id} is in {signing.signing_dir() / signing.RETIRED_DIRNAME})" if old_id else ""))
    for name in store.names():
        for version in store.versions(name):
            try:
                store.verify_signature(name, version, old_keys)
            except ServeAppError as exc:
                print(f"not re-signed {name} v{version}: {exc.message}")
                continue
            store.sign_version(name, version)
            print(f"re-signed {name} v{version}")
    print(f"give replicas the new public key {public} (args.trusted_keys)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from serve_app.ops.report import fetch_summary, write_pages

    try:
        summary = fetch_summary(args.url, args.model, args.api_key)
    except OSError as exc:
        raise ValueError(f"cannot read {args.url.rstrip('/')}/v2/models/{args.model}/monitoring: {exc}") from None
    for path in write_pages(summary, Path(args.out), Path(args.png) if args.png else None, args.url):
        print(f"wrote {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from serve_app.ops.launcher import run

    return run(Path(args.config), fast_path=not args.no_fast_path, dashboard_port=args.dashboard_port, model=args.model)


def cmd_bench(args: argparse.Namespace) -> int:
    from serve_app.ops.bench import SERVERS, BenchOptions, run as bench

    servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
    unknown = [s for s in servers if s not in SERVERS]
    if unknown:
        raise ValueError(f"unknown server {unknown[0]!r} in --servers; choose from {', '.join(SERVERS)}")
    if not 0 < args.soak_load <= 1:
        raise ValueError(f"--soak-load {args.soak_load:g} is not a share of the peak; give a number in (0, 1], e.g. 0.7")
    outcome = bench(BenchOptions(
        out=Path(args.out), quick=args.quick, duration_s=args.duration, config=Path(args.config),
        servers=servers, generator=args.loadgen, soak_s=args.soak, soak_load=args.soak_load,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()), warmup_s=args.warmup,
    ))
    # serve_app's failures fail the run; a baseline's (timeouts at c=128, say) are findings.
    failed = sum(r["errors"] + r["timeouts"] + r["non_2xx"] for r in outcome["results"] if r["server"] == "serve_app")
    return 1 if failed else 0


def cmd_tune(args: argparse.Namespace) -> int:
    from serve_app.ops.tune import TuneOptions, run as tune

    if args.slo_p99_ms <= 0 or args.budget_s <= 0 or args.max_replicas < 1 or args.max_connections < 1:
        raise ValueError("--slo-p99-ms and --budget-s must be > 0, --max-replicas and --max-connections >= 1")
    outcome = tune(TuneOptions(
        config=Path(args.config), slo_p99_ms=args.slo_p99_ms, max_replicas=args.max_replicas, budget_s=args.budget_s,
        out=Path(args.out), address=args.address, url=args.url, app=args.app, max_connections=args.max_connections,
        generator=args.loadgen,
    ))
    if outcome["interrupted"]:
        return 130
    if outcome["error"]:
        print(f"serve-app: error: tune stopped early: {outcome['error']}", file=sys.stderr)
        return 1
    return 0 if outcome["recommended"] else 1


def cmd_batch(args: argparse.Namespace) -> int:
    from serve_app.ops.batch import run_batch

    result = run_batch(
        args.model, args.input, args.output, store=args.store, errors_output=args.errors,
        chunk_bytes=args.chunk_mb * 1024 * 1024, overwrite=args.overwrite, progress=not args.no_progress,
        address=args.address,
    )
    print(
        f"{result.model} v{result.version}: {result.rows} rows in {result.seconds:.1f}s "
        f"({result.rows_per_s:,.0f} rows/s): {result.predicted} predictions -> {result.output}, "
        f"{result.errors} bad rows -> {result.errors_output}"
    )
    print(f"  runtime: {result.runtime}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from serve_app.model.formats import FORMATS
    from serve_app.model.training import CHURN_DATASET, DATASETS, DEFAULT_DATASET, DEFAULT_MODEL_NAME, ESTIMATORS

    parser = argparse.ArgumentParser(prog="serve-app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_store(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--store", default=default_store(), help="model store directory (default: $SERVE_APP_STORE or ./models)")
        return p

    train = with_store(commands.add_parser("train", help="train a model and store it as a new version"))
    train.add_argument("--name", default=None, help="model name in the store (default: iris; churn for --dataset churn)")
    train.add_argument("--dataset", default=DEFAULT_DATASET, choices=sorted([*DATASETS, CHURN_DATASET]),
                       help="built-in dataset: scikit-learn's, synthetic30 (30-feature make_classification, 10,000 rows), "
                       "or churn (synthetic customers: numbers, strings, booleans, missing values; a Pipeline)")
    estimators = sorted({name for choices in ESTIMATORS.values() for name in choices})
    train.add_argument(
        "--estimator", default=None, choices=estimators,
        help="default: the first for the dataset's task (logistic_regression, linear_regression); "
        + "; ".join(f"{task}: {', '.join(choices)}" for task, choices in ESTIMATORS.items()),
    )
    train.add_argument("--format", default="skops", choices=FORMATS, help="skops (safe, default) or joblib (pickle)")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train)

    models = commands.add_parser("models", help="list, inspect, promote and roll back stored versions")
    sub = models.add_subparsers(dest="models_command", required=True)
    listing = with_store(sub.add_parser("list", help="names, versions, aliases, live traffic shares, metrics"))
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--address", default=None, help="a running cluster's dashboard: adds each version's traffic share")
    listing.add_argument("--app", default="serve_app", help="application name in the Serve config")
    listing.add_argument("--url", default=None)
    listing.set_defaults(func=cmd_models_list)
    show = with_store(sub.add_parser("show", help="a version's manifest"))
    show.add_argument("name")
    show.add_argument("ref", nargs="?", default=DEFAULT_ALIAS, help="version or alias (default: production)")
    show.set_defaults(func=cmd_models_show)
    imported = with_store(sub.add_parser(
        "import", help="publish a model you fitted and saved with joblib.dump (needs --trust-pickle)"))
    imported.add_argument("model_file", metavar="MODEL_FILE", help="the joblib/pickle file of a fitted estimator or Pipeline")
    imported.add_argument("--name", required=True, help="model name in the store")
    imported.add_argument("--sample", required=True,
                          help="its training data (or a sample of it), .csv or .parquet: the schema and statistics")
    imported.add_argument("--target", default=None, help="the sample's and test set's target column, split off")
    imported.add_argument("--test", default=None, help="a labelled test set (.csv or .parquet) to score; needs --target")
    imported.add_argument("--trust-pickle", action="store_true",
                          help="load MODEL_FILE although unpickling runs its code: only for files you made")
    imported.set_defaults(func=cmd_models_import)
    def live(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--address", default=None, help="Ray dashboard of the running cluster (default: $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265)")
        p.add_argument("--app", default="serve_app", help="application name in the Serve config")
        p.add_argument("--url", default=None, help="the app's HTTP base URL (default: from the cluster's http_options)")
        p.add_argument("--store-only", action="store_true", help="change the store only; leave the running app alone")
        return with_store(p)

    promote = live(sub.add_parser("promote", help="verify a version, switch the running app to it live, point an alias at it"))
    promote.add_argument("name")
    promote.add_argument("ref", help="version number or alias")
    promote.add_argument("--alias", default=DEFAULT_ALIAS)
    promote.add_argument("--reason", default="")
    promote.set_defaults(func=cmd_models_promote)
    rollback = live(sub.add_parser("rollback", help="switch back to the version the alias named before"))
    rollback.add_argument("name")
    rollback.add_argument("--alias", default=DEFAULT_ALIAS)
    rollback.set_defaults(func=cmd_models_rollback)
    canary = live(sub.add_parser("canary", help="send a share of traffic to a candidate version (weight 0 ends it)"))
    canary.add_argument("name")
    canary.add_argument("ref", help="candidate version number or alias")
    canary.add_argument("--weight", type=float, required=True, help="share of requests for the candidate, 0..1 (e.g. 0.1)")
    canary.add_argument("--sticky-header", default=None, help="request header that pins a caller to one side (e.g. x-user-id)")
    canary.set_defaults(func=cmd_models_canary)
    shadow = live(sub.add_parser("shadow", help="mirror traffic to a candidate, compare, never return its answers"))
    shadow.add_argument("name")
    shadow.add_argument("ref", nargs="?", default=None, help="candidate version number or alias")
    shadow.add_argument("--fraction", type=float, default=1.0, help="share of requests mirrored (default 1.0)")
    shadow.add_argument("--off", action="store_true", help="stop shadowing")
    shadow.set_defaults(func=cmd_models_shadow)
    status = sub.add_parser("status", help="what each running replica serves: versions, canary, shadow, traffic")
    status.add_argument("--address", default=None)
    status.add_argument("--app", default="serve_app")
    status.add_argument("--url", default=None)
    status.set_defaults(func=cmd_models_status)
    history = with_store(sub.add_parser("history", help="the append-only log of alias moves"))
    history.add_argument("name")
    history.set_defaults(func=cmd_models_history)
    sign = with_store(sub.add_parser("sign", help="sign a version (or all) with this machine's publisher key"))
    sign.add_argument("name")
    sign.add_argument("ref", help="version number or alias, or 'all'")
    sign.set_defaults(func=cmd_models_sign)

    keys = commands.add_parser("keys", help="the publisher key that signs model versions (serve_app/model/signing.py)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    show_key = keys_sub.add_parser("show", help="the public key to give replicas (creates the pair on first use)")
    show_key.add_argument("--no-create", action="store_true", help="fail if there is no key yet")
    show_key.set_defaults(func=cmd_keys_show)
    rotate = with_store(keys_sub.add_parser("rotate", help="a new key pair; re-sign the store's versions with it"))
    rotate.set_defaults(func=cmd_keys_rotate)

    run = commands.add_parser("run", help="serve a config in the foreground on a fresh local Ray (Ctrl-C stops all)")
    run.add_argument("--config", default="configs/local.yaml")
    run.add_argument("--no-fast-path", action="store_true", help="use Ray's default proxy instead of HAProxy")
    run.add_argument("--dashboard-port", type=int, default=None,
                     help="the Ray dashboard's port (default: 8265, Ray's own, or the next free one)")
    run.add_argument("--model", default=None, metavar="NAME",
                     help="serve this stored model instead of the config's args.model (the config file is not changed)")
    run.set_defaults(func=cmd_run)

    report = commands.add_parser("report", help="render a running app's monitoring (traffic, latency, classes, drift, accuracy) as HTML")
    report.add_argument("--url", default="http://127.0.0.1:8000", help="the app's base URL")
    report.add_argument("--model", default="iris")
    report.add_argument("--out", default="report.html", help="the HTML page (plots embedded)")
    report.add_argument("--png", default=None, help="also write the plots as a PNG here")
    report.add_argument("--api-key", default=None, help="if the app requires one (args.api_key)")
    report.set_defaults(func=cmd_report)

    bench = commands.add_parser("bench", help="benchmark the local deployment against Flask and Starlette baselines")
    bench.add_argument("--quick", action="store_true", help="a smoke run: 2 s per workload")
    bench.add_argument("--out", default="bench-results", help="folder for results.md, results.json, bench.png")
    bench.add_argument("--config", default="configs/local.yaml", help="the Serve config to benchmark")
    bench.add_argument("--duration", type=float, default=None, help="seconds per workload (default 10, 2 with --quick)")
    bench.add_argument("--servers", default="flask,starlette,mlserver,serve_app", help="comma-separated subset to run")
    bench.add_argument("--models", default="iris,forest,boosting",
                       help="comma-separated: iris (LogisticRegression), forest (RandomForest, 200 trees), boosting "
                            "(HistGradientBoosting, 200 iterations); --quick shrinks the heavy ones")
    bench.add_argument("--warmup", type=float, default=None,
                       help="seconds of 1-row c=32 load on each server before each model's figures (default 30, 1 with --quick)")
    bench.add_argument("--loadgen", default="auto", choices=("auto", "wrk", "python"), help="auto: wrk if installed")
    bench.add_argument("--soak", type=float, default=0.0, help="seconds of a further c=32 run to watch memory growth")
    bench.add_argument("--soak-load", type=float, default=0.7,
                       help="share of this run's c=32 peak the soak offers, by pacing (default 0.7; 1: flat out)")
    bench.set_defaults(func=cmd_bench)

    tune = commands.add_parser("tune", help="measure replica and batching settings against a p99 SLO; write a tuned config")
    tune.add_argument("--config", default="configs/local.yaml", help="the Serve config to tune (tuned.yaml is a patched copy)")
    tune.add_argument("--slo-p99-ms", type=float, required=True, help="p99 latency objective in ms (1-row POST /predict)")
    tune.add_argument("--max-replicas", type=int, default=max(1, os.cpu_count() or 1), help="most replicas tried (default: CPUs)")
    tune.add_argument("--budget-s", type=float, default=300.0, help="seconds of measuring once the app serves (default 300)")
    tune.add_argument("--out", default="tune-results", help="folder for tune.md, tune.json, tune.png, tuned.yaml")
    tune.add_argument("--address", default=None, help="tune the app on this running cluster's dashboard (restored after) "
                      "instead of a private local Ray")
    tune.add_argument("--url", default=None, help="with --address: the app's HTTP base URL (default: from http_options)")
    tune.add_argument("--app", default="serve_app", help="application name in the Serve config")
    tune.add_argument("--max-connections", type=int, default=64, help="most concurrent connections of the load (default 64)")
    tune.add_argument("--loadgen", default="auto", choices=("auto", "wrk", "python"), help="auto: wrk if installed")
    tune.set_defaults(func=cmd_tune)

    batch = with_store(commands.add_parser("batch", help="predict a CSV or Parquet file offline on Ray Data"))
    batch.add_argument("--model", default=DEFAULT_MODEL_NAME, help="NAME[:VERSION or alias] (default: iris, i.e. iris:production)")
    batch.add_argument("--input", required=True, help="a .csv (header optional) or .parquet file, or a directory of Parquet files")
    batch.add_argument("--output", required=True, help="Parquet dataset directory to write: row, prediction")
    batch.add_argument("--errors", default=None, help="where bad rows go with their reason (default: OUTPUT.errors)")
    batch.add_argument("--chunk-mb", type=int, default=16, help="CSV bytes per task (memory per task is a few times this)")
    batch.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch.add_argument("--address", default=None, help="a running cluster (e.g. auto, or ray://...); default: $RAY_ADDRESS, else a local Ray")
    batch.set_defaults(func=cmd_batch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before Ray reads its config: commands that reach a running cluster (models status,
    # promote, batch on RAY_ADDRESS, ...) must send its token.
    os.environ.update(processes.ray_token_auth_env())
    try:
        return int(args.func(args))
    except (ServeAppError, ValueError) as exc:
        message = exc.message if isinstance(exc, ServeAppError) else str(exc)
        print(f"serve-app: error: {message}", file=sys.stderr)
        return 2
    except DeployFailed as exc:  # serve-app bench / tune: the app they deployed cannot start
        print(f"serve-app: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
