"""The Northwind kiosk demo: the whole loop on one machine, with embedded defaults only.

A cloud agent (SQLite, the packaged SmolLM2 as its LLM, the store's knowledge base) and a
kiosk edge agent (the same small model, quantized, on the device) start on loopback. The kiosk
plays a labelled workload; a simulated customer rates each answer (thumbs down when an answer
misses the expected facts) and a store associate corrects the thumbs-down answers from the
knowledge base (`--no-corrections` leaves them uncorrected). The cloud distils what it
answered into a LoRA adapter, gates it on held-out questions, signs it and rolls it out; the
kiosk verifies, hot-swaps and reports it. Then the workload is played again, and a
before/after table is printed. Last, the workload is played a third time with every request
sent to the cloud, as a kiosk without a model of its own would: what the cloud costs when the
device answers nothing, against which the kiosk's saving is stated (`--no-cloud-only` skips it).

`--turns N` turns the loop N times, playing the workload before each cycle and once after the
last. The cloud's knowledge base then starts with the first of N parts of the store's facts
and gains the next part before each later turn, as a store adds to its knowledge base over
time: what the customers ask about the facts still missing, the cloud cannot answer yet, and
each turn has new facts to move onto the device. Each cycle's adapter must do at least as well
as the one on offer before it replaces it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloud_agent.config import CloudConfig
from cloud_agent.distill import DistillConfig, DistillResult, distill
from cloud_agent.distill.dataset import Example, expectations_from_workload
from cloud_agent.distill.paraphrase import paraphrase
from cloud_agent.distill.train import LoraSettings
from cloud_agent.evaluation import contains_expected
from cloud_agent.knowledge import Fact, load_facts
from cloud_agent.service import CloudService
from cloud_agent.store import RoutingSummary
from edge_agent import EdgeAgent, Target
from edge_agent.link import CloudLink
from edge_agent.local_model import DeviceProfile, LocalModel, choose_settings
from edge_agent.outbox import Outbox
from examples.kiosk.intents import KIOSK_INTENTS, KIOSK_REPLIES
from protocol import BaseModelRef
from shared.files import read_jsonl

__all__ = ["Pass", "run_demo"]

HERE = Path(__file__).resolve().parent
DEFAULT_WORKLOAD = HERE / "northwind-workload-dev.jsonl"
DEFAULT_KB = HERE / "northwind-kb.md"


@dataclass
class Pass:
    """What one play of the workload measured."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    cloud_tokens: int = 0
    raw_pii_at_cloud: int = 0
    corrections: int = 0

    def cloud_requests(self) -> int:
        return sum(1 for r in self.rows if r["cloud"])

    def share_on_device(self) -> float:
        return sum(1 for r in self.rows if not r["cloud"]) / max(1, len(self.rows))

    def fact_accuracy(self, *, cloud: bool) -> tuple[int, int]:
        facts = [r for r in self.rows if r["class"] == "learnable_fact" and r["cloud"] == cloud]
        return sum(r["correct"] for r in facts), len(facts)

    def latency(self, *, cloud: bool) -> tuple[float, float]:
        values = sorted(r["latency_ms"] for r in self.rows if r["cloud"] == cloud)
        if not values:
            return float("nan"), float("nan")
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        return statistics.median(values), p95

    def figures(self) -> dict[str, Any]:
        cloud_ok, cloud_n = self.fact_accuracy(cloud=True)
        dev_ok, dev_n = self.fact_accuracy(cloud=False)

        def ms(cloud: bool) -> list[float | None]:  # None for no such answers: NaN is not JSON
            return [None if v != v else round(v, 1) for v in self.latency(cloud=cloud)]

        return {
            "requests": len(self.rows),
            "share_on_device": round(self.share_on_device(), 4),
            "cloud_tokens": self.cloud_tokens,
            "fact_accuracy_cloud": [cloud_ok, cloud_n],
            "fact_accuracy_device": [dev_ok, dev_n],
            "raw_pii_at_cloud": self.raw_pii_at_cloud,
            "associate_corrections": self.corrections,
            "latency_ms_device_p50_p95": ms(cloud=False),
            "latency_ms_cloud_p50_p95": ms(cloud=True),
        }


def load_workload(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, required=("text", "class"))


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


async def play(
    name: str,
    agent: EdgeAgent,
    service: CloudService,
    workload: list[dict[str, Any]],
    corrections: dict[str, str] | None = None,
    *,
    override: Target | None = None,
    rate: bool = True,
) -> Pass:
    """Play `workload` through `agent`; `override` routes every request there, and `rate`
    False leaves the answers unrated (so the cloud learns nothing from the pass)."""
    result = Pass(name)
    started = time.perf_counter()
    for i, row in enumerate(workload, 1):
        reply = await agent.ask(row["text"], override=override)
        expect = row.get("expect") or []
        correct = contains_expected(reply.text, expect) if expect else None
        result.rows.append(
            {
                "id": row.get("id"),
                "class": row["class"],
                "request_id": reply.request_id,
                "cloud": reply.from_cloud,
                "latency_ms": reply.latency_ms,
                "correct": bool(correct),
            }
        )
        if correct is not None and rate:  # the simulated customer knows the answer it needed
            # A thumbs-down on a store fact reaches a store associate, who types the right
            # answer from the knowledge base (rows name their fact); the cloud trains on it.
            fix = None if correct or corrections is None else corrections.get(row.get("fact", ""))
            await agent.feedback(
                reply.request_id, "positive" if correct else "negative", correction=fix
            )
            result.corrections += fix is not None
        if i % 30 == 0 or i == len(workload):
            say(
                f"{name}: {i}/{len(workload)} requests, "
                f"{result.share_on_device():.0%} on the device, "
                f"{time.perf_counter() - started:.0f} s"
            )
    if agent.link is not None:
        await agent.link.wait_outbox_empty(30)
    await service.server.recorder.flush()
    ids = {r["request_id"] for r in result.rows}
    interactions = [
        it for it in await service.store.list_interactions(limit=100_000) if it.request_id in ids
    ]
    result.cloud_tokens = sum(it.prompt_tokens + it.completion_tokens for it in interactions)
    raw_values = {
        item["value"] if isinstance(item, dict) else str(item)
        for row in workload
        for item in row.get("pii", [])
    }
    seen = "\n".join(json.dumps(it.messages) for it in interactions)
    result.raw_pii_at_cloud = sum(1 for value in raw_values if value and value in seen)
    return result


def table(
    passes: list[Pass],
    cycles: list[dict[str, Any]],
    wall_seconds: float,
    cloud_only: Pass | None = None,
    reported: RoutingSummary | None = None,
) -> str:
    """The passes side by side (before the first cycle, then after each), what each cycle
    published, and the saving against a cloud-only kiosk."""

    def frac(ok_n: tuple[int, int]) -> str:
        ok, n = ok_n
        return f"{ok}/{n} ({ok / n:.0%})" if n else "-"

    def lat(p: Pass, cloud: bool) -> str:
        p50, p95 = p.latency(cloud=cloud)
        return "-" if p50 != p50 else f"{p50:.0f} / {p95:.0f} ms"

    def tokens(p: Pass) -> str:
        before = passes[0].cloud_tokens
        if p is passes[0] or not before:
            return f"{p.cloud_tokens:,}"
        return f"{p.cloud_tokens:,} ({1 - p.cloud_tokens / before:.0%} fewer)"

    last = "one cycle" if len(cycles) == 1 else f"{len(cycles)} turns"
    then = "the cycle" if len(cycles) == 1 else last
    heads = ["before"] + (
        ["after one cycle"]
        if len(cycles) == 1
        else [f"after turn {k}" for k in range(1, len(passes))]
    )
    lines = [
        ("", *heads),
        ("answered on the device", *(f"{p.share_on_device():.1%}" for p in passes)),
        ("cloud tokens", *map(tokens, passes)),
        ("fact accuracy, cloud answers", *(frac(p.fact_accuracy(cloud=True)) for p in passes)),
        ("fact accuracy, device answers", *(frac(p.fact_accuracy(cloud=False)) for p in passes)),
        ("raw PII values seen by the cloud", *(str(p.raw_pii_at_cloud) for p in passes)),
        ("requests sent to the cloud", *(str(p.cloud_requests()) for p in passes)),
        ("latency p50 / p95, device", *(lat(p, False) for p in passes)),
        ("latency p50 / p95, cloud", *(lat(p, True) for p in passes)),
    ]
    width = [max(len(row[i]) for row in lines) for i in range(len(heads) + 1)]
    out = [
        "  "
        + "  ".join(
            f"{cell:<{width[i]}}" if i == 0 else f"{cell:>{width[i]}}" for i, cell in enumerate(row)
        )
        for row in lines
    ]
    out.insert(1, "  " + "-" * (sum(width) + 2 * len(heads)))
    out.append("")
    for k, extra in enumerate(cycles, 1):
        name = "adapter" if len(cycles) == 1 else f"turn {k}, adapter"
        out.append(f"  {name}: {extra['adapter']}")
        if "adapter_bytes" in extra:
            out.append(
                f"  ({extra['heldout_examples']:.0f} held-out questions, trained on "
                f"{extra['train_examples']:.0f} examples, {extra['simple_regressions']:.0f} "
                "regressions on simple requests)"
            )
            out.append(
                f"  adapter file {extra['adapter_bytes'] / 1e6:.1f} MB = "
                f"{extra['adapter_share_of_base']:.1%} of the base model file; "
                f"training {extra['train_seconds']:.0f} s"
            )
    after = passes[-1]
    if cloud_only is not None:
        sent = cloud_only.cloud_requests()
        fewer = 1 - after.cloud_requests() / sent if sent else 0.0
        cheaper = (
            1 - after.cloud_tokens / cloud_only.cloud_tokens if cloud_only.cloud_tokens else 0.0
        )
        out.append(
            f"  cloud only (every request sent, to the same cloud after {then}): {sent} "
            f"requests, {cloud_only.cloud_tokens:,} cloud tokens, fact accuracy "
            f"{frac(cloud_only.fact_accuracy(cloud=True))}"
        )
        out.append(
            f"  against it, the kiosk after {last} sends {fewer:.0%} fewer requests and uses "
            f"{cheaper:.0%} fewer cloud tokens"
        )
    if reported is not None:
        views = [
            f"{'base model' if version is None else f'adapter {version}'} "
            f"{counts.on_device_share or 0:.1%} of {counts.total}"
            for version, counts in reported.by_adapter_version.items()
        ]
        out.append(
            "  on the device, as the cloud sees it from the kiosk's routing reports: "
            + ", ".join(views)
        )
    corrected = sum(p.corrections for p in passes)
    out.append(
        f"  {corrected} answers corrected by a store associate; "
        f"whole demo {wall_seconds:.0f} s (--json writes every figure)"
    )
    return "\n".join(out)


def knowledge_stages(facts: list[Fact], turns: int) -> list[list[Fact]]:
    """The knowledge base as it grows over `turns` turns: the facts in their order, in `turns`
    near-equal parts, each stage holding the parts up to its own."""
    if not 1 <= turns <= len(facts):
        raise ValueError(f"turns must be from 1 to {len(facts)} (the number of facts)")
    ends = [round(len(facts) * k / turns) for k in range(1, turns + 1)]
    return [facts[:end] for end in ends]


def write_knowledge(path: Path, facts: list[Fact]) -> None:
    """A knowledge file holding `facts`, replaced whole (written beside, then renamed, as the
    cloud's watch asks)."""
    text = "# Northwind Outfitters — store knowledge base\n\n" + "".join(
        f"- [{f.id}] {f.text}\n" for f in facts
    )
    partial = path.with_suffix(".part")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


async def run_demo(
    workload_path: Path = DEFAULT_WORKLOAD,
    *,
    work_dir: Path,
    steps: int = 80,
    paraphrases: bool = True,
    corrections: bool = True,
    compare_cloud_only: bool = True,
    json_path: Path | None = None,
    turns: int = 1,
) -> dict[str, Any]:
    """Play, distil and apply `turns` times, then play once more (and once all to the cloud).

    With more than one turn, the cloud's knowledge base grows between turns: it starts with
    the first of `turns` parts of the store's facts and gains the next part before each later
    turn (`knowledge_stages`), as a store adds to its knowledge base over time, so each turn of
    the loop has new facts to move onto the device."""
    started = time.perf_counter()
    demo_started = datetime.now(UTC)
    workload = load_workload(workload_path)
    stages = knowledge_stages(load_facts(DEFAULT_KB), turns)
    work_dir.mkdir(parents=True, exist_ok=True)
    knowledge = DEFAULT_KB
    if turns > 1:
        knowledge = work_dir / "northwind-kb.md"
        write_knowledge(knowledge, stages[0])
    config = CloudConfig.model_validate(
        {
            "data_dir": work_dir / "cloud",
            "port": 0,
            "admin_port": 0,
            "knowledge": knowledge,
            "knowledge_watch": False,  # the demo reloads it itself when it grows
            "store_name": "Northwind Outfitters",
            "backend": {"n_ctx": 1024},
            "rollout": {"canary_share": 0.1},
        }
    )
    say("starting the cloud agent (SQLite, embedded SmolLM2, Northwind knowledge base)")
    service = await CloudService.create(config)
    await service.start()
    agent: EdgeAgent | None = None
    passes: list[Pass] = []
    results: list[DistillResult] = []
    try:
        say("starting the kiosk (SmolLM2-135M Q4_1 on the device) and enrolling it")
        profile = DeviceProfile.detect()
        model = LocalModel(
            profile=profile,
            settings=dataclasses.replace(choose_settings(profile), n_ctx=1024, max_tokens=40),
        )
        token = await service.store.create_enrollment_token(note="northwind kiosk demo")
        state = work_dir / "kiosk"
        link = CloudLink(
            f"ws://127.0.0.1:{service.port}/v1", state, enrollment_token=token,
            base_model=BaseModelRef(id=model.model_id, sha256=model.sha256),
            outbox=Outbox(state / "outbox.db"), device_name="kiosk-aisle-3",
        )  # fmt: skip
        # The demo reports when its passes end (`send_report`), not every 5 minutes: the
        # comparison pass (all to the cloud) is not the kiosk's traffic and is left out.
        agent = EdgeAgent(
            model, link=link, cloud_max_tokens=64, local_max_tokens=40, report_every_s=None
        )
        for name, examples in KIOSK_INTENTS.items():
            agent.intent(name, examples, KIOSK_REPLIES.get(name))
        agent.enable_updates(state)
        await agent.start()
        if not await link.wait_up(15):
            raise RuntimeError("the kiosk could not reach the cloud")

        dconfig = DistillConfig(
            lora=LoraSettings(steps=steps, progress=sys.stderr.isatty()),
            expectations=expectations_from_workload(workload_path),
            canary_share=config.rollout.canary_share,
            eval_max_tokens=32,
            phone_regions=config.phone_regions,
        )

        async def more_wordings(train: list[Example]) -> list[Example]:
            return await paraphrase(
                train, backend=service.backend, scheduler=service.scheduler, per_question=1
            )

        for turn, known in enumerate(stages, 1):
            if turn > 1:
                write_knowledge(knowledge, known)
                changes = await service.curator.reload()
                say(f"the store adds {len(changes['added'])} facts to its knowledge base")
            name = f"pass {turn}"
            say(f"{name}: playing {len(workload)} requests from {workload_path.name}")
            # A thumbs-down on a store fact reaches a store associate, who types the right
            # answer from the knowledge base as it stands (rows name their fact).
            fixes = {f.id: f.text for f in known} if corrections else None
            played = await play(name, agent, service, workload, fixes)
            passes.append(played)
            say(f"{name}: {played.corrections} thumbs-down answers corrected by a store associate")

            say("distilling: dataset from the cloud's answers and the ratings, LoRA training")
            result = await distill(
                service.store, config=dconfig,
                work_dir=work_dir / ("distill" if turns == 1 else f"distill-{turn}"),
                bundles_dir=service.bundles_dir, signing_key=service.signing_key, progress=say,
                paraphraser=more_wordings if paraphrases else None,
            )  # fmt: skip
            results.append(result)
            if result.published:
                assert agent.updater is not None
                agent.updater.applied.clear()
                await service.published()
                await asyncio.wait_for(agent.updater.applied.wait(), 120)
                say(f"the kiosk verified, hot-swapped and reported bundle {result.version}")
            else:
                say(f"no bundle published: {result.reason}")

        name = f"pass {turns + 1}"
        say(f"{name}: playing the workload again")
        passes.append(await play(name, agent, service, workload))
        # The cloud's own view of the passes, from the routing reports of the kiosk, one per
        # adapter it answered with.
        await agent.send_report()
        await link.wait_outbox_empty(30)
        reported = await service.store.routing_summary(demo_started)
        cloud_only = None
        if compare_cloud_only:
            # Last, so that nothing it sends trains the adapter or the cloud's index.
            name = f"pass {turns + 2}"
            say(f"{name}: the workload again, every request sent to the cloud (unrated)")
            cloud_only = await play(
                name, agent, service, workload, override=Target.CLOUD, rate=False
            )
    finally:
        if agent is not None:
            await agent.stop()
        await service.stop()

    wall = round(time.perf_counter() - started, 1)
    cycles = [{"adapter": r.reason, **r.metrics} for r in results]
    figures: dict[str, Any] = {
        "before": passes[0].figures(),
        "after": passes[-1].figures(),
        "distill": {**cycles[-1], "wall_seconds": wall},
        "reported_routing": reported.as_dict(),
    }
    if turns > 1:
        figures["turns"] = [
            {"knowledge_facts": len(known), "played": p.figures(), "distill": cycle}
            for known, p, cycle in zip(stages, passes, cycles, strict=False)
        ]
    if cloud_only is not None:
        figures["cloud_only"] = cloud_only.figures()
    print()
    print(table(passes, cycles, wall, cloud_only, reported))
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2))
    return figures


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    work_dir = Path(tempfile.mkdtemp(prefix="edgeloop-demo-")) if args.dir is None else args.dir
    try:
        asyncio.run(
            run_demo(
                args.workload,
                work_dir=work_dir,
                steps=args.steps,
                paraphrases=not args.no_paraphrases,
                corrections=not args.no_corrections,
                compare_cloud_only=not args.no_cloud_only,
                json_path=args.json,
                turns=args.turns,
            )
        )
    finally:
        if args.dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the Northwind kiosk demo: cloud + edge on this machine, one learning cycle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workload", type=Path, default=DEFAULT_WORKLOAD,
        help="JSON lines with text, class and optional expect/pii (default: the dev workload)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--steps", type=int, default=80, help="LoRA training steps")
    parser.add_argument(
        "--turns", type=int, choices=range(1, 6), default=1, metavar="N",
        help="turns of the loop (default 1); with more, the cloud's knowledge base starts with "
        "part of the store's facts and gains the next part before each later turn",
    )  # fmt: skip
    parser.add_argument(
        "--no-paraphrases", action="store_true", help="train on the observed wordings only"
    )
    parser.add_argument(
        "--no-corrections",
        action="store_true",
        help="thumbs-down answers are not corrected by a store associate",
    )
    parser.add_argument(
        "--no-cloud-only",
        action="store_true",
        help="skip the third pass, every request sent to the cloud, that the saving is stated "
        "against (it takes one to three minutes)",
    )
    parser.add_argument(
        "--dir", type=Path, help="keep the cloud's and kiosk's state here (default: a temp dir)"
    )
    parser.set_defaults(func=_run)
