"""A directory of immutable, versioned models with aliases.

    models/<name>/<version>/model.skops   the artefact (read-only once written)
    models/<name>/<version>/manifest.json its hash, library versions, schema, metrics, stats
    models/<name>/aliases.json            {"production": "2", ...}
    models/<name>/history.jsonl           append-only log of alias moves

Versions are whole numbers handed out in order and never overwritten. `latest` is always
the highest complete version; other aliases are set with `promote`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from serve_app import artefacts
from serve_app.artefacts import ModelFormat
from serve_app.errors import ModelLoadError, NotFound, StoreError
from serve_app.manifest import MANIFEST_FILENAME, MODEL_FILENAMES, Manifest, sha256_of

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
LATEST = "latest"
DEFAULT_ALIAS = "production"
ALIASES_FILENAME = "aliases.json"
HISTORY_FILENAME = "history.jsonl"
LOCK_FILENAME = ".lock"


def is_version(ref: str) -> bool:
    """A version number: ASCII digits only ('²'.isdigit() is true, but int('²') fails)."""
    return ref.isascii() and ref.isdigit()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database in some containers
        return str(os.getuid())


def _write_json_atomically(path: Path, payload: Any) -> None:
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False)
    with handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


class ModelStore:
    """Versioned models under one root directory (a local or shared path)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self._locks_held = threading.local()

    @contextlib.contextmanager
    def alias_lock(self, name: str) -> Iterator[None]:
        """Serialises alias changes of one model across threads and processes.

        Without it two concurrent first saves both saw no `production` and both set it,
        and two promotes could lose one another's alias (read-modify-write of aliases.json).
        Re-entrant within a thread; a flock, so it also holds between processes.
        """
        held: set[str] = getattr(self._locks_held, "names", set())
        self._locks_held.names = held
        directory = self.model_dir(name)
        if name in held or not directory.is_dir():  # nothing to lock: a later step raises NotFound
            yield
            return
        with open(directory / LOCK_FILENAME, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            held.add(name)
            try:
                yield
            finally:
                held.discard(name)

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # ---- names and paths -------------------------------------------------------------

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise StoreError(
                f"invalid model name {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return name

    def _inside_root(self, path: Path) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise StoreError(f"{path} resolves outside the model store {self.root}; refusing it")
        return resolved

    def model_dir(self, name: str) -> Path:
        return self._inside_root(self.root / self.check_name(name))

    def version_dir(self, name: str, version: str) -> Path:
        if not is_version(str(version)):
            raise StoreError(f"invalid version {version!r}: versions are whole numbers")
        return self._inside_root(self.model_dir(name) / str(int(version)))

    # ---- reading ---------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name))

    def versions(self, name: str) -> list[str]:
        """Complete versions (those with a manifest), oldest first."""
        directory = self.model_dir(name)
        if not directory.is_dir():
            return []
        found = [
            p.name
            for p in directory.iterdir()
            if is_version(p.name) and (p / MANIFEST_FILENAME).is_file()
        ]
        return sorted(found, key=int)

    def aliases(self, name: str) -> dict[str, str]:
        path = self.model_dir(name) / ALIASES_FILENAME
        aliases: dict[str, str] = {}
        if path.is_file():
            aliases = {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
        versions = self.versions(name)
        if versions:
            aliases[LATEST] = versions[-1]
        return aliases

    def resolve(self, name: str, ref: str | int = DEFAULT_ALIAS) -> str:
        """The version a version number or alias names; NotFound if there is none."""
        ref = str(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise NotFound(f"no model named {name!r} in {self.root} (models: {known})")
        if is_version(ref):
            version = str(int(ref))
            if version not in versions:
                raise NotFound(f"model {name!r} has no version {ref} (versions: {', '.join(versions)})")
            return version
        aliases = self.aliases(name)
        if ref not in aliases:
            raise NotFound(
                f"model {name!r} has no alias {ref!r} (aliases: {', '.join(sorted(aliases)) or 'none'}); "
                f"set one with: serve-app models promote {name} <version> --alias {ref}"
            )
        return aliases[ref]

    def manifest(self, name: str, ref: str | int = DEFAULT_ALIAS) -> Manifest:
        version = self.resolve(name, ref)
        path = self.version_dir(name, version) / MANIFEST_FILENAME
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except Exception as exc:
            raise ModelLoadError(f"manifest {path} is unreadable or invalid: {exc}") from exc

    def model_path(self, manifest: Manifest) -> Path:
        if manifest.model_file not in MODEL_FILENAMES.values():
            raise ModelLoadError(
                f"manifest of {manifest.name} v{manifest.version} names model file "
                f"{manifest.model_file!r}; only {', '.join(MODEL_FILENAMES.values())} are allowed"
            )
        version_dir = self.version_dir(manifest.name, manifest.version)
        path = version_dir / manifest.model_file
        if path.is_symlink() or not self._inside_root(path).is_relative_to(version_dir):
            raise ModelLoadError(f"{path} is a link or lies outside its version directory; refusing it")
        return path

    def load_verified(self, name: str, ref: str | int = DEFAULT_ALIAS) -> tuple[Any, Manifest]:
        """The model object and its manifest, after its sha256 matched the manifest's."""
        manifest = self.manifest(name, ref)
        path = self.model_path(manifest)
        if not path.is_file():
            raise ModelLoadError(f"model file {path} is missing (manifest of {name} v{manifest.version})")
        actual = sha256_of(path)
        if actual != manifest.sha256:
            raise ModelLoadError(
                f"sha256 of {path} is {actual[:16]}..., the manifest says {manifest.sha256[:16]}...; "
                "the file was changed after it was stored, refusing to load it"
            )
        return artefacts.load(path, manifest.format), manifest

    def history(self, name: str) -> list[dict[str, Any]]:
        path = self.model_dir(name) / HISTORY_FILENAME
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # ---- writing ---------------------------------------------------------------------

    def _reserve_version(self, name: str) -> tuple[str, Path]:
        directory = self.model_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        taken = [int(p.name) for p in directory.iterdir() if is_version(p.name)]
        candidate = max(taken, default=0) + 1
        while True:
            path = directory / str(candidate)
            try:
                path.mkdir()  # atomic: two writers never get the same version
                return str(candidate), path
            except FileExistsError:
                candidate += 1

    def save(
        self,
        model: Any,
        manifest_fields: dict[str, Any],
        *,
        fmt: ModelFormat = "skops",
        promote_first: bool = True,
    ) -> Manifest:
        """Stores `model` as the next version of `manifest_fields['name']`."""
        name = self.check_name(manifest_fields["name"])
        version, directory = self._reserve_version(name)
        try:
            model_file = MODEL_FILENAMES[fmt]
            path = directory / model_file
            artefacts.dump(model, path, fmt)
            manifest = Manifest(
                **{
                    **manifest_fields,
                    "version": version,
                    "created_at": _now(),
                    "created_by": _whoami(),
                    "format": fmt,
                    "model_file": model_file,
                    "sha256": sha256_of(path),
                    "size_bytes": path.stat().st_size,
                }
            )
            os.chmod(path, 0o444)
            # The manifest goes last: a version without one is incomplete and never served.
            _write_json_atomically(directory / MANIFEST_FILENAME, manifest.model_dump(mode="json"))
            os.chmod(directory / MANIFEST_FILENAME, 0o444)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        if promote_first:
            with self.alias_lock(name):
                if DEFAULT_ALIAS not in self.aliases(name):
                    self.promote(name, version, DEFAULT_ALIAS, reason="first version")
        return manifest

    def promote(self, name: str, ref: str | int, alias: str = DEFAULT_ALIAS, reason: str = "") -> str:
        """Points `alias` at the version `ref` names, and logs the move."""
        if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias) or alias == LATEST:
            raise StoreError(
                f"invalid alias {alias!r}: use lowercase letters, digits, '_' or '-' "
                f"(and not {LATEST!r}, which always means the highest version)"
            )
        version = self.resolve(name, ref)
        self.manifest(name, version)  # refuse to point an alias at an unreadable version
        with self.alias_lock(name):
            aliases = {k: v for k, v in self.aliases(name).items() if k != LATEST}
            previous = aliases.get(alias)
            aliases[alias] = version
            _write_json_atomically(self.model_dir(name) / ALIASES_FILENAME, aliases)
            self.log_event(name, {"action": "promote", "alias": alias, "version": version, "previous": previous, "reason": reason})
        return version

    def previous_version(self, name: str, alias: str = DEFAULT_ALIAS) -> str:
        """The version `alias` named before its last move (what a rollback goes back to)."""
        moves = [e for e in self.history(name) if e.get("alias") == alias]
        current = self.aliases(name).get(alias)
        for entry in reversed(moves):
            previous = entry.get("previous")
            if entry.get("version") == current and previous and previous != current:
                return str(previous)
        raise StoreError(f"alias {alias!r} of {name!r} has no earlier version to roll back to")

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> str:
        """Points `alias` back at the version it named before its last move."""
        with self.alias_lock(name):  # the previous version cannot change before it is promoted
            return self.promote(name, self.previous_version(name, alias), alias, reason="rollback")

    def log_event(self, name: str, entry: dict[str, Any]) -> None:
        """Appends to the model's history.jsonl (who and when are added)."""
        line = json.dumps({"at": _now(), "by": _whoami(), **entry}, sort_keys=True)
        with open(self.model_dir(name) / HISTORY_FILENAME, "a") as handle:
            handle.write(line + "\n")

    def iter_manifests(self) -> Iterator[Manifest]:
        for name in self.names():
            for version in self.versions(name):
                yield self.manifest(name, version)
