"""Applying verified update bundles on the device.

`UpdateManager.apply` stages a downloaded bundle atomically on disk, hot-swaps its adapter into
the running model (no reload of the base), runs a short self-check on built-in prompts (output
not empty, confidence not collapsed), and only then commits: one atomic rename of
``active.json``. On any failure the previous adapter stays or comes back, and the result says
why. The previous version is kept for rollback.

The commit point is a single ``os.replace`` of a fsynced file, so a device killed at any
moment restarts (`restore`) with exactly one verified version active: the old one if the kill
came before the commit, the new one after it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edge_agent.local_model import Adapter, AdapterError, LocalModel
from edge_agent.router import Coverage, Router
from edge_agent.updates import BundleDownload, UpdateRejected
from protocol import BundleManifest

__all__ = ["ApplyResult", "UpdateManager", "active_version", "bundle_manifest"]

SELF_CHECK_PROMPTS = (
    "Hello!",
    "What can you help me with?",
    "Thank you, goodbye.",
)


@dataclass(frozen=True)
class ApplyResult:
    status: Literal["applied", "rejected", "rolled_back"]
    version: int
    reason: str | None = None
    self_check: dict[str, float] = field(default_factory=dict)


def active_version(state_dir: Path) -> int | None:
    """The bundle version committed on the device whose state is in `state_dir` (None: the
    base model)."""
    try:
        return int(json.loads((state_dir / "updates" / "active.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def bundle_manifest(state_dir: Path, version: int) -> BundleManifest:
    """The manifest of a bundle kept on the device, as it was verified when it arrived (its
    files are not checked again here). Raises OSError or ValueError when it cannot be read."""
    path = state_dir / "updates" / "versions" / str(version) / "manifest.json"
    return BundleManifest.model_validate_json(path.read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class UpdateManager:
    """Owns which bundle version is active on this device."""

    def __init__(
        self,
        model: LocalModel,
        router: Router,
        state_dir: Path,
        *,
        min_confidence: float = 0.05,
        self_check_tokens: int = 12,
    ) -> None:
        self.model = model
        self.router = router
        self.state_dir = state_dir
        self.root = state_dir / "updates"
        self.versions = self.root / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)
        self.min_confidence = min_confidence
        self.self_check_tokens = self_check_tokens
        self._adapter: Adapter | None = None

    # --- what is active -------------------------------------------------------------------

    @property
    def current_version(self) -> int | None:
        return active_version(self.state_dir)

    def _bundle(self, version: int) -> tuple[BundleManifest, dict[str, Path]]:
        manifest = bundle_manifest(self.state_dir, version)
        directory = self.versions / str(version)
        return manifest, BundleDownload(manifest, self.versions, directory=directory).verify()

    def restore(self) -> int | None:
        """At start-up: re-verify and activate the committed version (None: the base)."""
        version = self.current_version
        if version is None:
            return None
        try:
            manifest, paths = self._bundle(version)
            self._activate(manifest, paths)
        except (UpdateRejected, AdapterError, OSError, ValueError):
            # The committed files no longer verify: run the base model rather than a doubt.
            (self.root / "active.json").unlink(missing_ok=True)
            return None
        return version

    # --- applying ---------------------------------------------------------------------------

    async def apply(self, manifest: BundleManifest, download: BundleDownload) -> ApplyResult:
        version = manifest.version
        try:
            download.verify()
        except UpdateRejected as exc:
            return ApplyResult("rejected", version, exc.reason)
        target = self.versions / str(version)
        if target.exists():
            shutil.rmtree(target)
        os.replace(download.directory, target)  # staged: same filesystem, atomic
        (target / "manifest.json").write_text(manifest.model_dump_json(), encoding="utf-8")
        paths = {f.name: target / f.name for f in manifest.files}  # verified just above
        previous = self._adapter
        try:
            adapter = self._load(manifest, paths)
        except AdapterError as exc:
            return ApplyResult("rejected", version, f"adapter: {exc}"[:200])
        self.model.activate(adapter)
        figures = await self._self_check()
        if figures["nonempty"] < 1.0 or figures["confidence"] < self.min_confidence:
            self.model.activate(previous)
            if adapter is not None:
                self.model.unload(adapter)
            return ApplyResult("rolled_back", version, "self-check failed", figures)
        _write_atomic(self.root / "active.json", json.dumps({"version": version}))  # commit
        if previous is not None:
            self.model.unload(previous)
        self._adapter = adapter
        self._install_coverage(paths)
        return ApplyResult("applied", version, None, figures)

    async def _self_check(self) -> dict[str, float]:
        nonempty, confidence = 0, []
        for prompt in SELF_CHECK_PROMPTS:
            result = await self.model.generate(
                [{"role": "user", "content": prompt}], max_tokens=self.self_check_tokens
            )
            nonempty += bool(result.text.strip())
            confidence.append(result.confidence)
        return {
            "nonempty": nonempty / len(SELF_CHECK_PROMPTS),
            "confidence": round(sum(confidence) / len(confidence), 4),
        }

    def _load(self, manifest: BundleManifest, paths: dict[str, Path]) -> Adapter | None:
        """The bundle's adapter, loaded; None for a bundle that returns to the base model."""
        adapters = [f for f in manifest.files if f.kind == "adapter"]
        if len(adapters) > 1:
            raise AdapterError("a bundle carries at most one adapter file")
        return self.model.load_adapter(paths[adapters[0].name]) if adapters else None

    def _activate(self, manifest: BundleManifest, paths: dict[str, Path]) -> None:
        adapter = self._load(manifest, paths)
        self.model.activate(adapter)
        self._adapter = adapter
        self._install_coverage(paths)

    def _install_coverage(self, paths: dict[str, Path]) -> None:
        for name, path in paths.items():
            if name.endswith(".json") and "coverage" in name:
                data = json.loads(path.read_text())
                self.router.coverage = Coverage(
                    tuple((str(text), float(acc)) for text, acc in data.get("examples", []))
                )
