"""`serve-app`: train, manage and serve models (also `python -m serve_app`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from serve_app.errors import ServeAppError
from serve_app.settings import default_store
from serve_app.store import DEFAULT_ALIAS, ModelStore


def _store(args: argparse.Namespace) -> ModelStore:
    return ModelStore(args.store)


def cmd_train(args: argparse.Namespace) -> int:
    from serve_app.training import train

    manifest = train(
        _store(args), name=args.name, dataset=args.dataset, estimator=args.estimator,
        fmt=args.format, seed=args.seed,
    )
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in manifest.metrics.items())
    aliases = [a for a, v in _store(args).aliases(manifest.name).items() if v == manifest.version]
    print(
        f"stored {manifest.name} v{manifest.version} ({manifest.estimator.rsplit('.', 1)[-1]} on "
        f"{manifest.dataset}, {manifest.format}; {metrics}) aliases: {', '.join(aliases)}"
    )
    print(f"  {_store(args).version_dir(manifest.name, manifest.version)}")
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def cmd_models_list(args: argparse.Namespace) -> int:
    store = _store(args)
    entries: list[dict[str, Any]] = []
    for name in store.names():
        aliases = store.aliases(name)
        for version in store.versions(name):
            manifest = store.manifest(name, version)
            entries.append({
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
    rows = [["NAME", "VERSION", "ALIASES", "ESTIMATOR", "DATASET", "FORMAT", "METRICS", "CREATED"]]
    for e in entries:
        metrics = " ".join(f"{k}={v:.3f}" for k, v in e["metrics"].items())
        rows.append([e["name"], e["version"], ",".join(e["aliases"]), e["estimator"], e["dataset"], e["format"], metrics, e["created_at"]])
    print(_table(rows))
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    manifest = _store(args).manifest(args.name, args.ref)
    print(json.dumps(manifest.model_dump(mode="json"), indent=2))
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    store = _store(args)
    before = store.aliases(args.name).get(args.alias)
    version = store.promote(args.name, args.ref, args.alias, reason=args.reason or "")
    print(f"{args.name}: {args.alias} -> v{version} (was {('v' + before) if before else 'unset'})")
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    store = _store(args)
    before = store.aliases(args.name).get(args.alias)
    version = store.rollback(args.name, args.alias)
    print(f"{args.name}: {args.alias} rolled back v{before} -> v{version}")
    return 0


def cmd_models_history(args: argparse.Namespace) -> int:
    for entry in _store(args).history(args.name):
        print(json.dumps(entry, sort_keys=True))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from serve_app.launcher import run

    return run(Path(args.config), fast_path=not args.no_fast_path)


def build_parser() -> argparse.ArgumentParser:
    from serve_app.artefacts import FORMATS
    from serve_app.training import DATASETS, DEFAULT_DATASET, DEFAULT_MODEL_NAME

    parser = argparse.ArgumentParser(prog="serve-app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_store(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--store", default=default_store(), help="model store directory (default: $SERVE_APP_STORE or ./models)")
        return p

    train = with_store(commands.add_parser("train", help="train a model and store it as a new version"))
    train.add_argument("--name", default=DEFAULT_MODEL_NAME, help="model name in the store (default: iris)")
    train.add_argument("--dataset", default=DEFAULT_DATASET, choices=sorted(DATASETS), help="built-in scikit-learn dataset")
    train.add_argument("--estimator", default=None, help="logistic_regression (default), random_forest, linear_regression")
    train.add_argument("--format", default="skops", choices=FORMATS, help="skops (safe, default) or joblib (pickle)")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train)

    models = commands.add_parser("models", help="list, inspect, promote and roll back stored versions")
    sub = models.add_subparsers(dest="models_command", required=True)
    listing = with_store(sub.add_parser("list", help="names, versions, aliases, metrics"))
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_models_list)
    show = with_store(sub.add_parser("show", help="a version's manifest"))
    show.add_argument("name")
    show.add_argument("ref", nargs="?", default=DEFAULT_ALIAS, help="version or alias (default: production)")
    show.set_defaults(func=cmd_models_show)
    promote = with_store(sub.add_parser("promote", help="point an alias (default: production) at a version"))
    promote.add_argument("name")
    promote.add_argument("ref", help="version number or alias")
    promote.add_argument("--alias", default=DEFAULT_ALIAS)
    promote.add_argument("--reason", default="")
    promote.set_defaults(func=cmd_models_promote)
    rollback = with_store(sub.add_parser("rollback", help="point an alias back at its previous version"))
    rollback.add_argument("name")
    rollback.add_argument("--alias", default=DEFAULT_ALIAS)
    rollback.set_defaults(func=cmd_models_rollback)
    history = with_store(sub.add_parser("history", help="the append-only log of alias moves"))
    history.add_argument("name")
    history.set_defaults(func=cmd_models_history)

    run = commands.add_parser("run", help="serve a config in the foreground on a fresh local Ray (Ctrl-C stops all)")
    run.add_argument("--config", default="configs/local.yaml")
    run.add_argument("--no-fast-path", action="store_true", help="use Ray's default proxy instead of HAProxy")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ServeAppError, ValueError) as exc:
        message = exc.message if isinstance(exc, ServeAppError) else str(exc)
        print(f"serve-app: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
