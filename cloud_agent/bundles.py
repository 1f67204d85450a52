"""Signed update bundles: a manifest plus files, signed with the cloud's Ed25519 key.

The manifest (`protocol.BundleManifest`) names the bundle, a version that only grows, the base
model's sha256, each file's sha256 and size, creation and expiry times and the evaluation
metrics. It is serialised once; those exact UTF-8 bytes are what is signed and what the
`update_offer` carries, so no canonical-JSON rules are needed on either side.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cloud_agent.store import Store
from protocol import BundleFile, BundleManifest, KeyEndorsement, UpdateOffer, endorse_key
from shared.errors import ConfigError
from shared.keys import SigningKey, b64url_encode

__all__ = ["build_bundle", "cluster_signing_key", "key_rotations", "rotate_signing_key"]

FileKind = Literal["adapter", "coverage", "other"]


async def cluster_signing_key(data_dir: Path, store: Store) -> SigningKey:
    """The key bundles are signed with: `data_dir/server.key` (made on first use), checked
    against the one the store's devices pinned at enrollment (recorded by the first replica
    to start). A replica or a CLI run holding another key (a data directory of its own, a
    lost file) raises `ConfigError` instead of signing bundles every device would reject."""
    path = data_dir / "server.key"
    made = not path.exists()
    key = SigningKey.load_or_create(path)  # on disk before devices can pin it
    ours = key.verify_key().b64()
    pinned = await store.pin_signing_key(ours)
    if pinned != ours:
        if made:
            path.unlink()  # the one to copy here is the cluster's, not this
        if ours in [public for public, _ in await store.signing_keys()]:
            raise ConfigError(
                "data_dir",
                f"{path} was rotated out (`edgeloop cloud rotate-key`): the key in use is "
                f"{pinned}; copy server.key from the data directory where it was rotated",
            )
        raise ConfigError(
            "data_dir",
            f"{path} is not the key this cloud's devices pinned at enrollment (its public half "
            f"is {pinned}, this one's {ours}); every replica, and every command that signs "
            "bundles, needs the same server.key: copy it from the first replica's data "
            "directory",
        )
    return key


MAX_ROTATIONS_TOLD = 32
"""The most rotations `welcome` carries (the newest): a device pinned to a key older than
those cannot follow, and needs enrolling again."""


async def key_rotations(store: Store) -> tuple[KeyEndorsement, ...]:
    """The rotations of the cluster's signing key, oldest first, as `welcome` tells them."""
    keys = await store.signing_keys()
    rotations = [
        KeyEndorsement(public_key=public, signature=endorsement)
        for public, endorsement in keys[1:]
        if endorsement is not None
    ]
    return tuple(rotations[-MAX_ROTATIONS_TOLD:])


async def rotate_signing_key(data_dir: Path, store: Store) -> SigningKey:
    """Replace the cluster's signing key (`data_dir/server.key`, which must be the key in
    use) with a new one it endorses, recorded in the store. The new key is on disk, beside the
    old, before the store names it; then it takes the old one's place."""
    old = await cluster_signing_key(data_dir, store)
    new = SigningKey.generate()
    path = data_dir / "server.key"
    staged = path.with_name("server.key.new")
    new.save(staged)
    endorsement = endorse_key(old, new.verify_key())
    try:
        await store.rotate_signing_key(
            old.verify_key().b64(), endorsement.public_key, endorsement.signature
        )
    except BaseException:
        staged.unlink()
        raise
    staged.replace(path)
    return new


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def build_bundle(
    directory: Path,
    *,
    name: str,
    version: int,
    base_model_sha256: str,
    files: Mapping[str, tuple[Path, FileKind]],
    key: SigningKey,
    metrics: Mapping[str, float] | None = None,
    ttl: timedelta = timedelta(days=30),
    now: datetime | None = None,
) -> UpdateOffer:
    """Copy `files` into ``directory/<version>/``, write and sign the manifest, return the offer."""
    target = directory / str(version)
    target.mkdir(parents=True, exist_ok=False)
    entries = []
    for file_name, (source, kind) in files.items():
        destination = target / file_name
        shutil.copyfile(source, destination)
        entries.append(
            BundleFile(
                name=file_name,
                kind=kind,
                sha256=_sha256(destination),
                size=destination.stat().st_size,
            )
        )
    created = now or datetime.now(UTC)
    manifest = BundleManifest(
        name=name,
        version=version,
        base_model_sha256=base_model_sha256,
        files=entries,
        created_at=created,
        expires_at=created + ttl,
        metrics=dict(metrics or {}),
    )
    text = manifest.model_dump_json()
    (target / "manifest.json").write_text(text, encoding="utf-8")
    signature = b64url_encode(key.sign(text.encode("utf-8")))
    (target / "manifest.sig").write_text(signature)
    return UpdateOffer(manifest=text, signature=signature)
