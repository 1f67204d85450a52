"""Applying bundles on the device: hot-swap, self-check, rollback, and kill -9 at any moment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cloud_agent.bundles import build_bundle
from edge_agent.apply import UpdateManager
from edge_agent.local_model import DeviceProfile, LocalModel, RuntimeSettings
from edge_agent.router import IntentIndex, Router
from edge_agent.updates import BundleDownload, verify_offer
from protocol import UpdateOffer
from shared import SigningKey
from shared.cli import main
from tests.edge_agent.lora import write_random_lora

pytestmark = pytest.mark.slow
KEY = SigningKey.generate()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model() -> LocalModel:
    settings = RuntimeSettings(threads=2, n_ctx=1024, max_tokens=12)
    return LocalModel(profile=DeviceProfile(cores=2, memory_mb=4096), settings=settings)


def make_bundle(
    tmp_path: Path, model: LocalModel, version: int, adapter: Path | None = None
) -> UpdateOffer:
    src = tmp_path / f"src{version}"
    src.mkdir()
    adapter = adapter or write_random_lora(src / "adapter.gguf", seed=version)
    (src / "coverage.json").write_text(
        json.dumps({"examples": [["How long can I return a jacket?", 0.9]]})
    )
    files = {
        "adapter.gguf": (adapter, "adapter"),
        "coverage.json": (src / "coverage.json", "coverage"),
    }
    return build_bundle(
        tmp_path / "cloud", name="facts", version=version, base_model_sha256=model.sha256,
        files=files, key=KEY,  # type: ignore[arg-type]
    )  # fmt: skip


def fetch(tmp_path: Path, model: LocalModel, offer: UpdateOffer, current: int | None) -> tuple:  # type: ignore[type-arg]
    manifest = verify_offer(offer, pinned_key=KEY.verify_key(), base_model_sha256=model.sha256,
                            current_version=current)  # fmt: skip
    download = BundleDownload(manifest, tmp_path / "device" / "staging")
    source = tmp_path / "cloud" / str(manifest.version)
    for f in manifest.files:
        download.write(f.name, 0, (source / f.name).read_bytes())
    return manifest, download


async def test_a_good_bundle_is_swapped_in_checked_committed_and_its_coverage_installed(
    tmp_path: Path, model: LocalModel, capsys: pytest.CaptureFixture[str]
) -> None:
    router = Router(IntentIndex())
    manager = UpdateManager(model, router, tmp_path / "device")
    result = await manager.apply(*fetch(tmp_path, model, make_bundle(tmp_path, model, 1), None))
    assert result.status == "applied" and manager.current_version == 1
    assert result.self_check["nonempty"] == 1.0 and result.self_check["confidence"] > 0
    assert model.active_adapter is not None
    assert router.decide("How long can I return a jacket?").reasons == ("coverage.match",)
    # The next version replaces it; the previous one's files are kept for rollback.
    result = await manager.apply(*fetch(tmp_path, model, make_bundle(tmp_path, model, 2), 1))
    assert result.status == "applied" and manager.current_version == 2
    assert (tmp_path / "device" / "updates" / "versions" / "1" / "adapter.gguf").exists()
    # `edgeloop edge status` shows the committed one.
    assert main(["edge", "status", "--state-dir", str(tmp_path / "device")]) == 0
    adapter = json.loads(capsys.readouterr().out)["adapter"]
    assert (adapter["version"], adapter["name"]) == (2, "facts")
    (tmp_path / "device" / "updates" / "versions" / "2" / "manifest.json").write_text("{")
    assert main(["edge", "status", "--state-dir", str(tmp_path / "device")]) == 0
    adapter = json.loads(capsys.readouterr().out)["adapter"]
    assert adapter["version"] == 2 and "cannot be read" in adapter["problem"]
    model.activate(None)


async def test_an_adapter_llama_cpp_refuses_is_rejected_and_the_previous_stays(
    tmp_path: Path, model: LocalModel
) -> None:
    manager = UpdateManager(model, Router(IntentIndex()), tmp_path / "device")
    await manager.apply(*fetch(tmp_path, model, make_bundle(tmp_path, model, 1), None))
    active = model.active_adapter
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(2000))  # signed and intact, but not an adapter
    result = await manager.apply(
        *fetch(tmp_path, model, make_bundle(tmp_path, model, 2, broken), 1)
    )
    assert result.status == "rejected" and result.reason is not None and "adapter" in result.reason
    assert model.active_adapter is active and manager.current_version == 1
    model.activate(None)


async def test_a_failed_self_check_rolls_back_to_the_previous_adapter(
    tmp_path: Path, model: LocalModel
) -> None:
    manager = UpdateManager(model, Router(IntentIndex()), tmp_path / "device")
    await manager.apply(*fetch(tmp_path, model, make_bundle(tmp_path, model, 1), None))
    active = model.active_adapter
    manager.min_confidence = 1.01  # no adapter can pass: the check itself is what is tested
    result = await manager.apply(*fetch(tmp_path, model, make_bundle(tmp_path, model, 2), 1))
    assert result.status == "rolled_back" and result.self_check["confidence"] < 1.01
    assert model.active_adapter is active and manager.current_version == 1
    model.activate(None)


async def test_restore_reactivates_the_committed_version_and_refuses_a_damaged_one(
    tmp_path: Path, model: LocalModel
) -> None:
    manager = UpdateManager(model, Router(IntentIndex()), tmp_path / "device")
    await manager.apply(*fetch(tmp_path, model, make_bundle(tmp_path, model, 1), None))
    model.activate(None)
    fresh = UpdateManager(model, Router(IntentIndex()), tmp_path / "device")
    assert fresh.restore() == 1 and model.active_adapter is not None
    model.activate(None)
    (tmp_path / "device" / "updates" / "versions" / "1" / "adapter.gguf").write_bytes(b"tampered")
    assert UpdateManager(model, Router(IntentIndex()), tmp_path / "device").restore() is None
    assert model.active_adapter is None


CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from edge_agent.apply import UpdateManager
    from edge_agent.local_model import DeviceProfile, LocalModel, RuntimeSettings
    from edge_agent.router import IntentIndex, Router
    from edge_agent.updates import BundleDownload
    from protocol import BundleManifest
    root = Path(sys.argv[1])
    model = LocalModel(profile=DeviceProfile(cores=1, memory_mb=2048),
                       settings=RuntimeSettings(threads=1, n_ctx=512, max_tokens=12))
    manager = UpdateManager(model, Router(IntentIndex()), root / "device")
    manager.restore()
    text = (root / "cloud" / "2" / "manifest.json").read_text()
    manifest = BundleManifest.model_validate_json(text)
    dl = BundleDownload(manifest, root / "device" / "staging")
    for f in manifest.files:
        dl.write(f.name, 0, (root / "cloud" / "2" / f.name).read_bytes())
    print("applying", flush=True)
    result = asyncio.run(manager.apply(manifest, dl))
    print(result.status, flush=True)
    """
)


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4, 5.0])
async def test_a_device_killed_during_an_update_restarts_with_exactly_one_verified_version(
    tmp_path: Path, model: LocalModel, delay: float
) -> None:
    manager = UpdateManager(model, Router(IntentIndex()), tmp_path / "device")
    await manager.apply(*fetch(tmp_path, model, make_bundle(tmp_path, model, 1), None))
    model.activate(None)
    make_bundle(tmp_path, model, 2)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "applying"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        child.stdout.close()
    restored = UpdateManager(model, Router(IntentIndex()), tmp_path / "device")
    version = restored.restore()
    assert version in (1, 2), "one committed version, verified, is active"
    assert model.active_adapter is not None
    model.activate(None)
