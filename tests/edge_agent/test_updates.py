"""Signed bundles: every attack the closed loop must survive, one test each."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloud_agent.bundles import build_bundle
from edge_agent.updates import BundleDownload, UpdateRejected, verify_offer
from protocol import UpdateOffer
from shared import SigningKey

BASE = "ab" * 32
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CLOUD_KEY = SigningKey.generate()


ADAPTER = b"GGUF" + b"\x01" * 4000


def bundle(
    tmp_path: Path,
    version: int = 3,
    *,
    content: bytes = ADAPTER,
    ttl: timedelta = timedelta(days=30),
    key: SigningKey = CLOUD_KEY,
) -> UpdateOffer:
    source = tmp_path / f"src-{version}"
    source.mkdir(exist_ok=True)
    (source / "adapter.gguf").write_bytes(content)
    (source / "coverage.json").write_text(json.dumps({"examples": [["Is shipping free?", 0.9]]}))
    return build_bundle(
        tmp_path / "bundles", name="northwind-facts", version=version, base_model_sha256=BASE,
        files={"adapter.gguf": (source / "adapter.gguf", "adapter"),
               "coverage.json": (source / "coverage.json", "coverage")},
        key=key, metrics={"fact_accuracy": 0.9}, ttl=ttl, now=NOW,
    )  # fmt: skip


def verify(offer: UpdateOffer, current: int | None = 2, *, now: datetime = NOW) -> object:
    return verify_offer(
        offer, pinned_key=CLOUD_KEY.verify_key(), base_model_sha256=BASE, current_version=current,
        now=now + timedelta(minutes=1),
    )  # fmt: skip


def download(tmp_path: Path, offer: UpdateOffer, *, chunk: int = 1000) -> BundleDownload:
    manifest = verify(offer)
    dl = BundleDownload(manifest, tmp_path / "staging")  # type: ignore[arg-type]
    source = tmp_path / "bundles" / str(manifest.version)  # type: ignore[attr-defined]
    for name in dl.missing():
        data = (source / name).read_bytes()
        for start in range(dl.offset(name), len(data), chunk):
            dl.write(name, start, data[start : start + chunk])
    return dl


def test_a_good_bundle_verifies_downloads_and_checks_out(tmp_path: Path) -> None:
    dl = download(tmp_path, bundle(tmp_path))
    paths = dl.verify()
    assert sorted(paths) == ["adapter.gguf", "coverage.json"]
    assert dl.manifest.metrics == {"fact_accuracy": 0.9}


def test_a_tampered_file_is_refused(tmp_path: Path) -> None:
    offer = bundle(tmp_path)
    (tmp_path / "bundles" / "3" / "adapter.gguf").write_bytes(b"GGUF" + b"\x02" * 4000)
    with pytest.raises(UpdateRejected) as info:
        download(tmp_path, offer).verify()
    assert info.value.reason == "hash_mismatch"


def test_a_truncated_download_is_refused_and_an_oversized_one_is_stopped_at_the_declared_size(
    tmp_path: Path,
) -> None:
    offer = bundle(tmp_path)
    dl = BundleDownload(verify(offer), tmp_path / "staging")  # type: ignore[arg-type]
    dl.write("adapter.gguf", 0, b"GGUF")
    with pytest.raises(UpdateRejected) as info:
        dl.verify()
    assert info.value.reason == "size_mismatch"
    with pytest.raises(UpdateRejected) as info:
        dl.write("adapter.gguf", 4, b"\x01" * 5000)  # more than the 4004 declared
    assert info.value.reason == "too_large"
    assert dl.offset("adapter.gguf") == 4, "nothing past the declared size was written"


def test_an_interrupted_download_resumes_from_what_is_on_disk(tmp_path: Path) -> None:
    offer = bundle(tmp_path)
    dl = BundleDownload(verify(offer), tmp_path / "staging")  # type: ignore[arg-type]
    data = (tmp_path / "bundles" / "3" / "adapter.gguf").read_bytes()
    dl.write("adapter.gguf", 0, data[:1500])
    again = BundleDownload(verify(offer), tmp_path / "staging")  # type: ignore[arg-type]
    assert again.offset("adapter.gguf") == 1500
    with pytest.raises(UpdateRejected, match="bad_range"):
        again.write("adapter.gguf", 0, data[:10])
    again.write("adapter.gguf", 1500, data[1500:])
    again.write("coverage.json", 0, (tmp_path / "bundles" / "3" / "coverage.json").read_bytes())
    assert again.verify()


def test_a_bundle_for_another_base_model_is_refused(tmp_path: Path) -> None:
    offer = bundle(tmp_path)
    with pytest.raises(UpdateRejected) as info:
        verify_offer(
            offer, pinned_key=CLOUD_KEY.verify_key(), base_model_sha256="cd" * 32,
            current_version=None, now=NOW,
        )  # fmt: skip
    assert info.value.reason == "wrong_base_model"


def test_an_older_or_equal_version_offered_again_is_refused(tmp_path: Path) -> None:
    offer = bundle(tmp_path, version=3)
    for current in (3, 4):
        with pytest.raises(UpdateRejected) as info:
            verify(offer, current)
        assert info.value.reason == "rollback"


def test_an_expired_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UpdateRejected) as info:
        verify(bundle(tmp_path, ttl=timedelta(hours=1)), now=NOW + timedelta(hours=2))
    assert info.value.reason == "expired"


def test_a_signature_by_another_key_or_an_edited_manifest_is_refused(tmp_path: Path) -> None:
    forged = bundle(tmp_path, key=SigningKey.generate())
    with pytest.raises(UpdateRejected) as info:
        verify(forged)
    assert info.value.reason == "bad_signature"
    genuine = bundle(tmp_path, version=4)
    edited = genuine.manifest.replace('"version":4', '"version":40')
    with pytest.raises(UpdateRejected, match="bad_signature"):
        verify(UpdateOffer(manifest=edited, signature=genuine.signature))


def test_files_from_two_different_bundles_cannot_be_mixed(tmp_path: Path) -> None:
    first = bundle(tmp_path, version=3)
    bundle(tmp_path, version=4, content=b"GGUF" + b"\x07" * 4000)  # same names, other content
    manifest = verify(first)
    dl = BundleDownload(manifest, tmp_path / "staging")  # type: ignore[arg-type]
    other = tmp_path / "bundles" / "4"
    dl.write("adapter.gguf", 0, (other / "adapter.gguf").read_bytes())
    dl.write("coverage.json", 0, (other / "coverage.json").read_bytes())
    with pytest.raises(UpdateRejected) as info:
        dl.verify()
    assert info.value.reason == "hash_mismatch"
    with pytest.raises(UpdateRejected, match="unknown_file"):
        dl.write("extra.bin", 0, b"x")
