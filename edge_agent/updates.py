"""Verifying and receiving update bundles on the device.

`verify_offer` checks an `update_offer` before anything is downloaded: the signature by the key
pinned at enrollment (over the manifest's exact bytes), the base model, that the version only
grows (rollback), and expiry (freeze). `BundleDownload` receives file ranges, refusing bytes
past a file's declared size or out of order, resumes from what is on disk, and `verify` checks
every file's size and sha256 against the manifest, so files from another bundle, truncated or
tampered files are refused. Each refusal is an `UpdateRejected` with a reason code, the one the
device reports in its `update_status`.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from edge_agent.errors import EdgeAgentError
from protocol import BundleFile, BundleManifest, UpdateOffer
from shared.errors import SignatureError
from shared.keys import VerifyKey, b64url_decode

__all__ = ["BundleDownload", "UpdateRejected", "verify_offer"]


class UpdateRejected(EdgeAgentError):
    """An update was refused; `reason` is a short code for the `update_status` report."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def verify_offer(
    offer: UpdateOffer,
    *,
    pinned_key: VerifyKey,
    base_model_sha256: str,
    current_version: int | None,
    now: datetime | None = None,
) -> BundleManifest:
    """The manifest of `offer`, if the device may apply it; else `UpdateRejected`."""
    try:
        signature = b64url_decode(offer.signature)
        pinned_key.verify(signature, offer.manifest.encode("utf-8"))
    except (SignatureError, ValueError) as exc:
        raise UpdateRejected("bad_signature", "not signed by the pinned cloud key") from exc
    try:
        manifest = BundleManifest.model_validate_json(offer.manifest)
    except ValidationError as exc:  # pragma: no cover - the signer wrote it
        raise UpdateRejected("bad_manifest", "manifest does not validate") from exc
    if manifest.base_model_sha256 != base_model_sha256:
        raise UpdateRejected("wrong_base_model", "bundle was built for another base model")
    if current_version is not None and manifest.version <= current_version:
        raise UpdateRejected(
            "rollback", f"version {manifest.version} is not above {current_version}"
        )
    moment = now or datetime.now(UTC)
    if manifest.expires_at <= moment:
        raise UpdateRejected("expired", "manifest expired (freeze attack or stale offer)")
    return manifest


class BundleDownload:
    """Receives the files of one verified manifest into a staging directory."""

    def __init__(
        self, manifest: BundleManifest, staging: Path, *, directory: Path | None = None
    ) -> None:
        self.manifest = manifest
        self.directory = directory or staging / f"{manifest.name}-{manifest.version}"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files = {f.name: f for f in manifest.files}

    def offset(self, file: str) -> int:
        """Bytes of `file` already on disk: where a resumed download continues."""
        path = self.directory / self._entry(file).name
        return path.stat().st_size if path.exists() else 0

    def missing(self) -> list[str]:
        return [f.name for f in self.manifest.files if self.offset(f.name) < f.size]

    def write(self, file: str, offset: int, data: bytes) -> None:
        entry = self._entry(file)
        have = self.offset(file)
        if offset != have:
            raise UpdateRejected("bad_range", f"{file}: got offset {offset}, expected {have}")
        if offset + len(data) > entry.size:
            raise UpdateRejected(
                "too_large", f"{file}: {offset + len(data)} bytes exceed the declared {entry.size}"
            )
        with (self.directory / entry.name).open("ab") as fh:
            fh.write(data)

    def verify(self) -> dict[str, Path]:
        """Every file complete and matching its sha256; returns name -> path."""
        paths = {}
        for entry in self.manifest.files:
            path = self.directory / entry.name
            size = path.stat().st_size if path.exists() else 0
            if size != entry.size:
                raise UpdateRejected("size_mismatch", f"{entry.name}: {size} of {entry.size} bytes")
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != entry.sha256:
                raise UpdateRejected("hash_mismatch", f"{entry.name}: content differs")
            paths[entry.name] = path
        return paths

    def _entry(self, file: str) -> BundleFile:
        entry = self._files.get(file)
        if entry is None:
            raise UpdateRejected("unknown_file", f"{file} is not in the manifest")
        return entry
