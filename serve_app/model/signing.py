"""Publisher signatures on model versions (Ed25519, from the `cryptography` package).

Whoever publishes a version (`serve-app train`, `models import`, `models sign`) signs the
sha256 of every file in it with a private key kept outside the model store; replicas hold
only public keys and refuse a version whose signature is missing, bad, or by a key they do
not trust, before any byte of it is parsed. Write access to the store is then not enough to
get a model loaded: that also takes the private key.

    ~/.config/serve_app/signing/signing_key.pem   private key (0600), the publisher's only
    ~/.config/serve_app/signing/signing_key.pub   its public key: give it to the replicas
    models/<name>/<version>/signature.json        {"payload": {...}, "signature": "..."}

$SERVE_APP_SIGNING_DIR moves the key directory. Replicas trust the public keys their
settings list (`args.trusted_keys`), else those in $SERVE_APP_TRUSTED_KEYS (paths joined by
':'), else the local public key: on a laptop the publisher and the server are one user.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from serve_app.errors import ModelLoadError, ServeAppError

SIGNATURE_FILENAME = "signature.json"
SIGNING_DIR_ENV = "SERVE_APP_SIGNING_DIR"
TRUSTED_KEYS_ENV = "SERVE_APP_TRUSTED_KEYS"
PRIVATE_KEY_FILENAME = "signing_key.pem"
PUBLIC_KEY_FILENAME = "signing_key.pub"
RETIRED_DIRNAME = "retired"
FORMAT = "serve_app-signature/1"
MAX_SIGNATURE_BYTES = 64 * 1024


class SignatureError(ModelLoadError):
    """A version that is unsigned, badly signed, or signed by a key the replica does not trust."""


class SigningKeyError(ServeAppError):
    """The signing or trusted keys cannot be read or are misplaced."""

    status_code = 500


def signing_dir() -> Path:
    configured = os.environ.get(SIGNING_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".config" / "serve_app" / "signing"


def key_id(public: Any) -> str:
    """The first 16 hex digits of the sha256 of the raw public key."""
    return hashlib.sha256(public.public_bytes_raw()).hexdigest()[:16]


def _write_key_pair(directory: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(directory / PRIVATE_KEY_FILENAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    (directory / PUBLIC_KEY_FILENAME).write_bytes(public)
    return key


def local_signer(create: bool = True) -> Any:
    """The publisher's private key, created (with its public key) on first use if `create`."""
    from cryptography.hazmat.primitives import serialization

    directory = signing_dir()
    path = directory / PRIVATE_KEY_FILENAME
    if not path.exists():
        if not create:
            raise SigningKeyError(f"no signing key in {directory}; publish a version (serve-app train) to create one")
        try:
            return _write_key_pair(directory)
        except FileExistsError:  # another process created it first: use theirs
            pass
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"the signing key {path} cannot be read: {exc}") from None


def load_public_key(path: str | os.PathLike[str]) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise SigningKeyError(f"trusted key {path} cannot be read: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"trusted key {path} is not an Ed25519 public key")
    return key


def trusted_key_paths(paths: Sequence[str] | None = None) -> list[Path]:
    if paths:
        return [Path(p).expanduser() for p in paths]
    configured = os.environ.get(TRUSTED_KEYS_ENV, "")
    if configured.strip():
        return [Path(p).expanduser() for p in configured.split(os.pathsep) if p.strip()]
    local = signing_dir() / PUBLIC_KEY_FILENAME
    return [local] if local.exists() else []


def trusted_keys(paths: Sequence[str] | None = None) -> dict[str, Any]:
    """Key id -> public key, for every key this process trusts."""
    keys = [load_public_key(p) for p in trusted_key_paths(paths)]
    return {key_id(k): k for k in keys}


def _canonical(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(name: str, version: str, files: Mapping[str, bytes], key: Any | None = None) -> bytes:
    """The signature.json bytes for a version made of `files` (file name -> content)."""
    key = key if key is not None else local_signer()
    payload = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "files": {file: hashlib.sha256(data).hexdigest() for file, data in sorted(files.items())},
        "key_id": key_id(key.public_key()),
        "signed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    signature = base64.b64encode(key.sign(_canonical(payload))).decode()
    return json.dumps({"payload": payload, "signature": signature}, indent=2, sort_keys=True).encode() + b"\n"


def how_to_sign(name: str, version: str) -> str:
    return (
        f"sign it where the publisher's key is with: serve-app models sign {name} {version}, "
        f"and give the replicas that key's public half (args.trusted_keys or ${TRUSTED_KEYS_ENV}; "
        "serve-app keys show prints it)"
    )


def verify(document: bytes | None, name: str, version: str, keys: Mapping[str, Any]) -> dict[str, str]:
    """The signed file name -> sha256 map, once the signature is good; SignatureError if not."""
    from cryptography.exceptions import InvalidSignature

    where = f"{name} v{version}"
    if document is None:
        raise SignatureError(f"{where} is not signed (no {SIGNATURE_FILENAME}); {how_to_sign(name, version)}")
    if not keys:
        raise SignatureError(
            f"{where} cannot be verified: this process trusts no signing key (set args.trusted_keys or "
            f"${TRUSTED_KEYS_ENV} to the publisher's public key, see serve-app keys show)"
        )
    try:
        if len(document) > MAX_SIGNATURE_BYTES:
            raise ValueError("too large")
        parsed = json.loads(document)
        payload, signature = parsed["payload"], base64.b64decode(parsed["signature"], validate=True)
        files = payload["files"]
        if not (isinstance(payload, dict) and isinstance(files, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
            raise TypeError("malformed payload")
    except Exception:
        raise SignatureError(f"{where} has an unreadable {SIGNATURE_FILENAME}; {how_to_sign(name, version)}") from None
    key = keys.get(str(payload.get("key_id")))
    if key is None:
        raise SignatureError(
            f"{where} is signed by key {str(payload.get('key_id'))[:16]!r}, which this process does not trust "
            f"(trusted: {', '.join(sorted(keys))}); {how_to_sign(name, version)}"
        )
    try:
        key.verify(signature, _canonical(payload))
    except InvalidSignature:
        raise SignatureError(f"{where} has a bad signature: {SIGNATURE_FILENAME} was not made by the key it names; "
                             f"{how_to_sign(name, version)}") from None
    if payload.get("format") != FORMAT or payload.get("name") != name or payload.get("version") != version:
        raise SignatureError(
            f"{where} carries a signature made for {payload.get('name')} v{payload.get('version')}; "
            f"{how_to_sign(name, version)}"
        )
    return dict(files)


def rotate() -> tuple[str | None, str]:
    """A new key pair; the old one moves to retired/ (kept, no longer used or trusted locally)."""
    directory = signing_dir()
    old_id = None
    private = directory / PRIVATE_KEY_FILENAME
    if private.exists():
        old_id = key_id(local_signer(create=False).public_key())
        retired = directory / RETIRED_DIRNAME
        retired.mkdir(exist_ok=True, mode=0o700)
        os.replace(private, retired / f"{old_id}.pem")
        os.replace(directory / PUBLIC_KEY_FILENAME, retired / f"{old_id}.pub")
    key = _write_key_pair(directory)
    return old_id, key_id(key.public_key())
