"""A directory of immutable, versioned models with aliases.

    models/<name>/<version>/model.skops   the artefact (read-only once written)
    models/<name>/<version>/model.onnx    its compiled form, when it converted and verified (compiled.py)
    models/<name>/<version>/manifest.json its hash, library versions, schema, metrics, stats
    models/<name>/<version>/signature.json the publisher's signature over both (signing.py)
    models/<name>/aliases.json            {"production": "2", ...}
    models/<name>/history.jsonl           append-only log of alias moves

Versions are whole numbers handed out in order and never overwritten. `latest` is always
the highest complete version; other aliases are set with `promote`.

A version is loaded only from bytes read once: the signature is checked over them, then the
same bytes are hashed, parsed and loaded. Links (symbolic or hard) to any of its files are
refused, and a manifest must name the directory it sits in. Errors name files relative to
the store root: callers of the HTTP API see them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import getpass
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from serve_app.model import formats

from serve_app.model import signing
from serve_app.model.formats import ModelFormat
from serve_app.errors import ModelLoadError, NotFound, StoreError
from serve_app.model.manifest import COMPILED_FILENAME, MANIFEST_FILENAME, MODEL_FILENAMES, Manifest, sha256_of

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
LATEST = "latest"
DEFAULT_ALIAS = "production"
ALIASES_FILENAME = "aliases.json"
HISTORY_FILENAME = "history.jsonl"
LOCK_FILENAME = ".lock"
MAX_REF_LENGTH = 64  # versions and aliases a caller may name; longer is refused before any lookup
VERSION_FILES = frozenset({MANIFEST_FILENAME, COMPILED_FILENAME, *MODEL_FILENAMES.values()})


def is_version(ref: str) -> bool:
    """A version number: ASCII digits only ('²'.isdigit() is true, but int('²') fails)."""
    return ref.isascii() and ref.isdigit() and len(ref) <= 18


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database in some containers
        return str(os.getuid())


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, indent=2, sort_keys=True).encode()


def _write_bytes_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    handle = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", delete=False)
    with handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if mode is not None:
        os.chmod(handle.name, mode)
    os.replace(handle.name, path)


def _write_json_atomically(path: Path, payload: Any) -> None:
    _write_bytes_atomically(path, _json_bytes(payload))


def check_ref_length(ref: str) -> None:
    if len(ref) > MAX_REF_LENGTH:
        raise NotFound(f"no version or alias of {len(ref)} characters; they have at most {MAX_REF_LENGTH}")


@dataclass(frozen=True)
class Catalog:
    """One model's versions and aliases as read from the store at one moment."""

    name: str
    versions: tuple[str, ...]
    aliases: Mapping[str, str]
    other_models: tuple[str, ...] = ()  # what the store holds instead, when it has no `name`

    def resolve(self, ref: str) -> str:
        """The version a version number or alias names; NotFound (with what exists) if none."""
        check_ref_length(ref)
        if not self.versions:
            raise NotFound(f"no model named {self.name!r} in the store (models: {', '.join(self.other_models) or 'none'})")
        if is_version(ref):
            version = str(int(ref))
            if version not in self.versions:
                raise NotFound(f"model {self.name!r} has no version {ref} (versions: {', '.join(self.versions)})")
            return version
        if ref not in self.aliases:
            raise NotFound(
                f"model {self.name!r} has no alias {ref!r} (aliases: {', '.join(sorted(self.aliases)) or 'none'}); "
                f"set one with: serve-app models promote {self.name} <version> --alias {ref}"
            )
        return self.aliases[ref]


class ModelStore:
    """Versioned models under one root directory (a local or shared path)."""

    def __init__(self, root: str | os.PathLike[str], trusted_keys: Sequence[str] | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self.trusted_keys = list(trusted_keys) if trusted_keys else None  # None: signing.trusted_keys' default
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

    def display(self, path: Path) -> str:
        """`path` as errors show it: relative to the store root, never absolute."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return path.name

    def _inside_root(self, path: Path) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            # Names are checked before this, so only a link in the store gets here: damage, a 500.
            raise StoreError(f"{self.display(path)} resolves outside the model store; refusing it", 500)
        return resolved

    def _read_file(self, path: Path) -> bytes:
        """The bytes of a regular file that is not a link of either kind; FileNotFoundError if absent."""
        try:
            # O_NONBLOCK: a FIFO put in a file's place is refused below instead of hanging the open.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the last component is a symbolic link
                raise ModelLoadError(f"{self.display(path)} is a link or lies outside its version directory; refusing it") from None
            raise
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise ModelLoadError(
                    f"{self.display(path)} is a link or lies outside its version directory "
                    f"({'a hard link' if info.st_nlink != 1 else 'not a regular file'}); refusing it"
                )
            return handle.read()

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

    def catalog(self, name: str) -> "Catalog":
        """`name`'s versions and aliases as read now: a replica resolves against this in memory."""
        versions = self.versions(name)
        return Catalog(name, tuple(versions), self.aliases(name) if versions else {}, tuple(self.names()) if not versions else ())

    def resolve(self, name: str, ref: str | int = DEFAULT_ALIAS) -> str:
        """The version a version number or alias names; NotFound if there is none."""
        ref = str(ref)
        check_ref_length(ref)
        return self.catalog(name).resolve(ref)

    def manifest(self, name: str, ref: str | int = DEFAULT_ALIAS) -> Manifest:
        """The manifest of a version, for listing and checks (`load_verified` verifies it too)."""
        version = self.resolve(name, ref)
        path = self.version_dir(name, version) / MANIFEST_FILENAME
        try:
            data = self._read_file(path)
        except FileNotFoundError:
            raise ModelLoadError(f"manifest {self.display(path)} is missing") from None
        return self._parse_manifest(data, name, version)

    def _parse_manifest(self, data: bytes, name: str, version: str) -> Manifest:
        try:
            manifest = Manifest.model_validate_json(data)
        except Exception as exc:
            raise ModelLoadError(f"manifest of {name} v{version} is unreadable or invalid: {exc}") from None
        if (manifest.name, manifest.version) != (name, version):
            raise ModelLoadError(
                f"the manifest in {name}/{version} describes {manifest.name} v{manifest.version}; "
                "a manifest must name the directory it is in, refusing it"
            )
        return manifest

    def model_path(self, manifest: Manifest) -> Path:
        if manifest.model_file not in MODEL_FILENAMES.values():
            raise ModelLoadError(
                f"manifest of {manifest.name} v{manifest.version} names model file "
                f"{manifest.model_file!r}; only {', '.join(MODEL_FILENAMES.values())} are allowed"
            )
        version_dir = self.version_dir(manifest.name, manifest.version)
        path = version_dir / manifest.model_file
        if path.is_symlink() or not self._inside_root(path).is_relative_to(version_dir):
            raise ModelLoadError(f"{self.display(path)} is a link or lies outside its version directory; refusing it")
        return path

    def _read_version(self, name: str, version: str, required: Sequence[str]) -> dict[str, bytes]:
        """The named files of a version, each read once (no links); ModelLoadError if one is missing."""
        directory = self.version_dir(name, version)
        files = {}
        for file in required:
            try:
                files[file] = self._read_file(directory / file)
            except FileNotFoundError:
                what = {MANIFEST_FILENAME: "manifest", COMPILED_FILENAME: "compiled model file"}.get(file, "model file")
                raise ModelLoadError(f"{what} {self.display(directory / file)} is missing (manifest of {name} v{version})") from None
        return files

    def verify_signature(self, name: str, version: str, keys: dict[str, Any] | None = None) -> dict[str, str]:
        """The signed file name -> sha256 map of a version; SignatureError unless a trusted key signed it."""
        try:
            document: bytes | None = self._read_file(self.version_dir(name, version) / signing.SIGNATURE_FILENAME)
        except FileNotFoundError:
            document = None
        return signing.verify(document, name, version, signing.trusted_keys(self.trusted_keys) if keys is None else keys)

    def load_verified(
        self, name: str, ref: str | int = DEFAULT_ALIAS, check: Callable[[Manifest], None] | None = None
    ) -> tuple[Any, Manifest]:
        """The model object and its manifest, from bytes read once and verified before parsing.

        The publisher's signature is checked over the sha256 of every file it lists; then
        the same bytes are hashed against it, the manifest is parsed (and given to `check`,
        e.g. library versions), and the model is rebuilt from allowed classes only.
        """
        version = self.resolve(name, ref)
        signed = self.verify_signature(name, version)
        unexpected = sorted(set(signed) - VERSION_FILES)
        if unexpected or MANIFEST_FILENAME not in signed:
            raise ModelLoadError(f"the signature of {name} v{version} lists unexpected files ({', '.join(unexpected)}); refusing it")
        manifest_bytes = self._read_version(name, version, [MANIFEST_FILENAME])[MANIFEST_FILENAME]
        self._check_hash(name, version, MANIFEST_FILENAME, manifest_bytes, signed[MANIFEST_FILENAME])
        manifest = self._parse_manifest(manifest_bytes, name, version)
        self.model_path(manifest)  # the model file name is one of the fixed ones
        if manifest.model_file not in signed:
            raise ModelLoadError(f"the signature of {name} v{version} does not cover {manifest.model_file}; refusing it")
        data = self._read_version(name, version, [manifest.model_file])[manifest.model_file]
        self._check_hash(name, version, manifest.model_file, data, signed[manifest.model_file])
        self._check_hash(name, version, manifest.model_file, data, manifest.sha256)
        if check is not None:
            check(manifest)
        return formats.loads(data, manifest.format, f"{name}/{version}/{manifest.model_file}"), manifest

    def load_compiled(self, manifest: Manifest) -> bytes:
        """The compiled model's bytes of a version `load_verified` returned the manifest of, read
        once and checked against that manifest's sha256 (signed with the manifest) and against the
        signature itself; ModelLoadError if either differs. Not parsed: `compiled.CompiledModel.load`
        checks the graph before ONNX Runtime sees it."""
        name, version, file = manifest.name, manifest.version, manifest.compiled_file
        if file is None or manifest.compiled_sha256 is None:
            raise ModelLoadError(f"{name} v{version} has no compiled model")
        data = self._read_version(name, version, [file])[file]
        self._check_hash(name, version, file, data, manifest.compiled_sha256)
        signed = self.verify_signature(name, version)
        if file not in signed:
            raise ModelLoadError(f"the signature of {name} v{version} does not cover {file}; refusing it")
        self._check_hash(name, version, file, data, signed[file])
        return data

    @staticmethod
    def _check_hash(name: str, version: str, file: str, data: bytes, expected: str) -> None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ModelLoadError(
                f"sha256 of {name}/{version}/{file} is {actual[:16]}..., the signed manifest says {expected[:16]}...; "
                "the file was changed after it was stored, refusing to load it"
            )

    def sign_version(self, name: str, ref: str | int, *, key: Any | None = None, check: bool = True) -> str:
        """Signs a stored version as its publisher (with the local key unless `key`).

        With `check`, the files must agree (manifest names its directory, model hash
        matches) and the model must pass the allow-list, statically: nothing is unpickled.
        """
        version = self.resolve(name, ref)
        if not check:  # whatever files the version holds, as they are (tests sign broken versions)
            directory = self.version_dir(name, version)
            present = sorted(f for f in VERSION_FILES if (directory / f).exists())
            self._write_signature(name, version, self._read_version(name, version, present), key)
            return version
        manifest = self.manifest(name, version)
        self.model_path(manifest)
        files = self._read_version(name, version, [MANIFEST_FILENAME, manifest.model_file])
        self._check_hash(name, version, manifest.model_file, files[manifest.model_file], manifest.sha256)
        formats.check(files[manifest.model_file], manifest.format, f"{name}/{version}/{manifest.model_file}")
        if manifest.compiled_file is not None:
            from serve_app.model.compiled import parse_safe  # onnx: only when there is a graph to check

            file = manifest.compiled_file
            files.update(self._read_version(name, version, [file]))
            self._check_hash(name, version, file, files[file], str(manifest.compiled_sha256))
            parse_safe(files[file])
        self._write_signature(name, version, files, key)
        return version

    def _write_signature(self, name: str, version: str, files: dict[str, bytes], key: Any | None) -> None:
        key_dir = signing.signing_dir().expanduser().resolve()
        if key is None and (key_dir == self.root or self.root in key_dir.parents):
            raise signing.SigningKeyError(
                f"the signing key directory is inside the model store; move it out (${signing.SIGNING_DIR_ENV})"
            )
        path = self.version_dir(name, version) / signing.SIGNATURE_FILENAME
        _write_bytes_atomically(path, signing.sign(name, version, files, key), 0o444)

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
        compiled: bytes | None = None,
    ) -> Manifest:
        """Stores `model` as the next version of `manifest_fields['name']`, with its compiled
        form (ONNX bytes, verified by the caller) beside it when given: hashed in the manifest
        and signed like the model file."""
        name = self.check_name(manifest_fields["name"])
        version, directory = self._reserve_version(name)
        try:
            model_file = MODEL_FILENAMES[fmt]
            path = directory / model_file
            formats.dump(model, path, fmt)
            compiled_fields: dict[str, Any] = {}
            if compiled is not None:
                _write_bytes_atomically(directory / COMPILED_FILENAME, compiled, 0o444)
                compiled_fields = {
                    "compiled_file": COMPILED_FILENAME,
                    "compiled_sha256": hashlib.sha256(compiled).hexdigest(),
                    "compiled_size_bytes": len(compiled),
                }
            manifest = Manifest(
                **{
                    **manifest_fields,
                    **compiled_fields,
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
            # Signed by the publisher's key (created on first use) over the model files as
            # read back from disk and the manifest about to be written.
            manifest_bytes = _json_bytes(manifest.model_dump(mode="json"))
            stored = [model_file] + ([COMPILED_FILENAME] if compiled is not None else [])
            files = {MANIFEST_FILENAME: manifest_bytes, **self._read_version(name, version, stored)}
            self._write_signature(name, version, files, None)
            # The manifest goes last: a version without one is incomplete and never served.
            _write_bytes_atomically(directory / MANIFEST_FILENAME, manifest_bytes)
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
