"""One distillation cycle: dataset -> LoRA -> GGUF -> evaluation gate -> signed bundle.

`distill` reads the store, trains on CPU (or a GPU), exports the adapter, measures it with
llama.cpp against the base on the held-out set and on simple prompts, and publishes a signed
bundle (adapter + router coverage) only when the adapter is better by `min_gain` and simple
prompts did not regress. From the second cycle on, the adapter the devices are offered now (the
incumbent) is measured on the same held-out questions, and the new one must not fall behind it:
each turn of the loop replaces an adapter only with a better one. Every figure is recorded with
the adapter, published or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from cloud_agent.bundles import build_bundle
from cloud_agent.config import PHONE_REGIONS
from cloud_agent.distill.dataset import Dataset, Example, build_dataset, private_kinds
from cloud_agent.distill.evaluate import (
    REPLAY_PROMPTS,
    SIMPLE_PROMPTS,
    GreedyModel,
    accuracy,
    coverage,
    score,
    simple_regressions,
)
from cloud_agent.distill.export import export_gguf_lora
from cloud_agent.distill.train import DistillSettingsError, LoraSettings, load_base, train_lora
from cloud_agent.errors import CloudAgentError
from cloud_agent.store import Store
from protocol import BundleManifest
from shared.keys import SigningKey
from shared.llama import default_model_path, file_sha256
from shared.pii import check_phone_regions

__all__ = [
    "DistillConfig",
    "DistillResult",
    "Incumbent",
    "distill",
    "incumbent",
    "train_and_measure",
]

log = logging.getLogger("edgeloop.cloud.distill")


@dataclass(frozen=True)
class DistillConfig:
    base_model: Path | None = None
    """The device's GGUF (default: the packaged SmolLM2); training reads its weights."""
    lora: LoraSettings = LoraSettings()
    heldout_share: float = 0.2
    min_examples: int = 8
    """Fewer training examples than this: no training (nothing worth shipping)."""
    min_gain: float = 0.1
    """Publish only if held-out fact accuracy rises by at least this much (absolute) over the
    base model."""
    min_gain_over_incumbent: float = 0.0
    """...and by at least this much over the adapter the devices are offered now, when there
    is one (0: no worse than it). The held-out questions are split off by a hash of the
    question and the seed, so with the same seed and share it did not train on them either."""
    max_simple_regressions: int = 0
    """Simple prompts allowed to lose their answer or start reciting facts."""
    coverage_min_accuracy: float = 0.75
    """Topics the adapter answers at least this well go into the router coverage."""
    eval_max_tokens: int = 48
    trusted_only: bool = True
    """Train only on answers quoted from knowledge facts, rated positive or corrected."""
    simple_prompts: tuple[str, ...] = SIMPLE_PROMPTS
    """Checked by the gate: still answered, and without reciting trained facts."""
    replay_prompts: tuple[str, ...] = REPLAY_PROMPTS
    """Trained on with the base model's own answers, against forgetting how to chat."""
    expectations: dict[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    """Labelled ``expect`` groups by normalised question (see `expectations_from_workload`)."""
    canary_share: float = 0.1
    bundle_ttl: timedelta = timedelta(days=30)
    phone_regions: tuple[str, ...] = PHONE_REGIONS
    """Where the check for raw personal data reads phone numbers without a country code (the
    cloud's `phone_regions`)."""

    def __post_init__(self) -> None:
        for bad, problem in (
            (not 0.0 <= self.heldout_share < 1.0, f"heldout_share {self.heldout_share}: 0 to 1"),
            (not -1.0 <= self.min_gain <= 1.0, f"min_gain {self.min_gain}: -1 to 1"),
            (
                not -1.0 <= self.min_gain_over_incumbent <= 1.0,
                f"min_gain_over_incumbent {self.min_gain_over_incumbent}: -1 to 1",
            ),
            (
                not 0.0 < self.canary_share <= 1.0,
                f"canary_share {self.canary_share}: above 0, at most 1",
            ),
            (self.min_examples < 1, f"min_examples {self.min_examples}: at least 1"),
        ):
            if bad:
                raise DistillSettingsError(problem)
        try:
            object.__setattr__(self, "phone_regions", check_phone_regions(self.phone_regions))
        except ValueError as exc:
            raise DistillSettingsError(str(exc)) from None

    @property
    def base_path(self) -> Path:
        return self.base_model or default_model_path()


@dataclass
class DistillResult:
    published: bool
    reason: str
    metrics: dict[str, float]
    version: int | None = None
    adapter_path: Path | None = None
    coverage: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Incumbent:
    """The bundle the devices are offered now, which a new adapter must not fall behind."""

    version: int
    adapter: Path | None
    """Its adapter file; None for a bundle without one (a rollback to the base model)."""


async def incumbent(store: Store, base_model_sha256: str) -> Incumbent | None:
    """The newest bundle on offer (in canary or to every device) for that base model."""
    for record, _ in (await store.offers()).bundles:
        if record.base_model_sha256 != base_model_sha256:
            continue
        files = BundleManifest.model_validate_json(record.manifest).files
        adapter = next((f.name for f in files if f.kind == "adapter"), None)
        return Incumbent(record.version, record.directory / adapter if adapter else None)
    return None


Progress = Callable[[str], None]
Paraphraser = Callable[[list[Example]], Awaitable[list[Example]]]


def base_answers(base: Path, prompts: tuple[str, ...], max_tokens: int) -> list[Example]:
    """The base model's own greedy answers to `prompts`, as training examples."""
    if not prompts:
        return []
    model = GreedyModel(base)
    try:
        pairs = [(p, model.answer(p, max_tokens=max_tokens)) for p in prompts]
    finally:
        model.close()
    return [Example(p, a, source="replay") for p, a in pairs if a]


def train_and_measure(
    dataset: Dataset,
    config: DistillConfig,
    work_dir: Path,
    progress: Progress = log.info,
    current: Incumbent | None = None,
) -> DistillResult:
    """Train, export and measure (blocking; runs in a worker thread) against the base and the
    `current` bundle's adapter. Does not publish."""
    work_dir.mkdir(parents=True, exist_ok=True)
    base = config.base_path
    started = time.perf_counter()
    replay = base_answers(base, config.replay_prompts, max_tokens=96)
    progress(f"loading {base.name} as float32 for training")
    model, tokenizer = load_base(base)
    train = [*dataset.train, *replay]
    progress(
        f"training on {len(dataset.train)} examples and {len(replay)} replayed base answers, "
        f"{config.lora.steps} steps"
    )
    trained = train_lora(model, tokenizer, train, config.lora, report=progress)
    adapter = export_gguf_lora(
        trained.weights, alpha=trained.alpha, base_gguf=base, path=work_dir / "adapter.gguf"
    )
    del model, trained
    train_s = time.perf_counter() - started
    rival = current.adapter if current is not None else None
    against = f"the base and version {current.version}" if current and rival else "the base"
    progress(f"evaluating the adapter against {against} with llama.cpp on held-out questions")
    evaluator = GreedyModel(base)
    try:
        tokens = config.eval_max_tokens
        before = score(evaluator, dataset.heldout, tokens)
        simple_before = [evaluator.answer(p, max_tokens=tokens) for p in config.simple_prompts]
        offered = before  # a bundle on offer without an adapter: the base model
        if rival is not None:
            evaluator.set_adapter(rival)
            offered = score(evaluator, dataset.heldout, tokens)
        evaluator.set_adapter(adapter)
        after = score(evaluator, dataset.heldout, tokens)
        seen = score(evaluator, dataset.train, tokens)
        simple_after = [evaluator.answer(p, max_tokens=tokens) for p in config.simple_prompts]
    finally:
        evaluator.close()
    report = {
        "heldout": [
            {"question": b.example.question, "before": b.answer, "after": a.answer,
             "correct_before": b.correct, "correct_after": a.correct}
            | ({"incumbent": o.answer, "correct_incumbent": o.correct} if current else {})
            for b, a, o in zip(before, after, offered, strict=True)
        ],
        "simple": [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in zip(config.simple_prompts, simple_before, simple_after, strict=True)
        ],
    }  # fmt: skip
    (work_dir / "evaluation.json").write_text(
        json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    regressions = simple_regressions(simple_before, simple_after, [e.answer for e in dataset.train])
    covered = coverage([*seen, *after], min_accuracy=config.coverage_min_accuracy)
    (work_dir / "coverage.json").write_text(
        json.dumps({"examples": covered}, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    base_size = base.stat().st_size
    metrics = {
        "train_examples": float(len(dataset.train)),
        "heldout_examples": float(len(after)),
        "heldout_accuracy_before": round(accuracy(before), 4),
        "heldout_accuracy_after": round(accuracy(after), 4),
        "train_accuracy_after": round(accuracy(seen), 4),
        "simple_regressions": float(regressions),
        "coverage_examples": float(len(covered)),
        "adapter_bytes": float(adapter.stat().st_size),
        "adapter_share_of_base": round(adapter.stat().st_size / base_size, 4),
        "train_seconds": round(train_s, 1),
    }
    if current is not None:
        metrics["incumbent_version"] = float(current.version)
        metrics["heldout_accuracy_incumbent"] = round(accuracy(offered), 4)
    passed, reason = gate(metrics, config)
    return DistillResult(passed, reason, metrics, None, adapter, covered)


def gate(metrics: dict[str, float], config: DistillConfig) -> tuple[bool, str]:
    """Whether an adapter may be published, and why (from its measured figures)."""
    gain = metrics["heldout_accuracy_after"] - metrics["heldout_accuracy_before"]
    if not metrics["heldout_examples"]:
        return False, "no held-out question with a known expectation: cannot gate"
    if gain < config.min_gain:
        return False, f"held-out accuracy gain {gain:+.2f} below the margin {config.min_gain:.2f}"
    if metrics["simple_regressions"] > config.max_simple_regressions:
        return False, f"{metrics['simple_regressions']:.0f} simple prompt(s) regressed"
    reason = (
        f"held-out accuracy {metrics['heldout_accuracy_before']:.0%} -> "
        f"{metrics['heldout_accuracy_after']:.0%}"
    )
    if "heldout_accuracy_incumbent" in metrics:
        offered, version = metrics["heldout_accuracy_incumbent"], metrics["incumbent_version"]
        over = metrics["heldout_accuracy_after"] - offered
        if over < config.min_gain_over_incumbent:
            return False, (
                f"held-out accuracy {metrics['heldout_accuracy_after']:.0%} against "
                f"{offered:.0%} for version {version:.0f}, on offer now: gain {over:+.2f} below "
                f"the margin {config.min_gain_over_incumbent:.2f}"
            )
        reason += f" ({offered:.0%} for version {version:.0f}, on offer now)"
    return True, reason


async def distill(
    store: Store,
    *,
    config: DistillConfig,
    work_dir: Path,
    bundles_dir: Path,
    signing_key: SigningKey,
    progress: Progress = log.info,
    paraphraser: Paraphraser | None = None,
    publish: bool = True,
) -> DistillResult:
    """One full cycle; publishes a bundle (and starts its rollout) if the gate passes and
    `publish` is set (without it: train and measure only, a dry run)."""
    dataset = await build_dataset(
        store,
        heldout_share=config.heldout_share,
        seed=config.lora.seed,
        trusted_only=config.trusted_only,
        expectations=config.expectations,
        phone_regions=config.phone_regions,
    )
    if paraphraser is not None and dataset.train:
        progress(f"paraphrasing {len(dataset.train)} training questions in the offline lane")
        offered = await paraphraser(dataset.train)
        # Made up by a model, not said by a customer: one that holds what looks like personal
        # data is left out rather than trained on (the dataset was checked before them).
        extra = [e for e in offered if not private_kinds(e, phone_regions=config.phone_regions)]
        dropped = {**dataset.dropped, "private_paraphrase": len(offered) - len(extra)}
        dataset = Dataset([*dataset.train, *extra], dataset.heldout, dropped)
        progress(f"{len(extra)} paraphrases accepted")
    progress(
        f"dataset: {len(dataset.train)} train, {len(dataset.heldout)} held out, "
        f"dropped {dataset.dropped}"
    )
    if len(dataset.train) < config.min_examples:
        return DistillResult(
            False,
            f"{len(dataset.train)} training examples, fewer than {config.min_examples}",
            {"train_examples": float(len(dataset.train))},
        )
    cycle_dir = work_dir / f"cycle-{int(time.time() * 1000)}"
    base_sha256 = await asyncio.to_thread(file_sha256, config.base_path)
    current = await incumbent(store, base_sha256)
    if current is not None and current.adapter is not None and not current.adapter.is_file():
        # Checked before training: an adapter that cannot be compared cannot be replaced.
        raise CloudAgentError(
            f"the adapter of version {current.version}, on offer now, is missing "
            f"({current.adapter}): the new one cannot be measured against it"
        )
    result = await asyncio.to_thread(
        train_and_measure, dataset, config, cycle_dir, progress, current
    )
    dataset.save(cycle_dir / "dataset.jsonl")
    if not result.published:
        progress(f"not published: {result.reason}")
        return result
    if not publish:
        result.published, result.reason = False, f"dry run; the gate passed: {result.reason}"
        progress(result.reason)
        return result
    assert result.adapter_path is not None
    version = await store.next_adapter_version()
    offer = build_bundle(
        bundles_dir,
        name="edgeloop-adapter",
        version=version,
        base_model_sha256=base_sha256,
        files={
            "adapter.gguf": (result.adapter_path, "adapter"),
            "coverage.json": (cycle_dir / "coverage.json", "coverage"),
        },
        key=signing_key,
        metrics={k: v for k, v in result.metrics.items() if math.isfinite(v)},
        ttl=config.bundle_ttl,
    )
    await store.add_adapter(
        offer, directory=bundles_dir / str(version), canary_share=config.canary_share
    )
    result.version = version
    progress(f"published bundle version {version}: {result.reason}")
    return result
