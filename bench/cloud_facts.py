"""Is the cloud right on store facts? Measured through the real server with the embedded model.

Plays the workload's `learnable_fact` requests through a `CloudService` with the packaged
SmolLM2 model and the store's knowledge base, and reports the share of answers that contain
every expected group (target: at least 95%), next to the retrieval hit rate (the right fact
ranked first) and the share answered from a grounded fact. Baseline in the same run: the
embedded model alone, with no knowledge base; and for contrast the same cloud with `quote_facts`
off, so that the model phrases every answer from the facts in its prompt.

Then one round of feedback, as a store associate would give it, on half of the questions (split
by a hash of the text): a thumbs-up where the answer was right, a correction quoting the fact
where it was wrong. Then every question is asked again: the rated half shows what the cloud
learned, the other half how far it carries to phrasings it has not seen.

    python -m bench.cloud_facts [--workload PATH] [--kb PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from cloud_agent.config import CloudConfig
from cloud_agent.evaluation import contains_expected
from cloud_agent.knowledge import KnowledgeBase, load_facts
from cloud_agent.service import CloudService
from examples.handshake import Device
from protocol import (
    AckReceived,
    ChatMessage,
    EnrollmentCredentials,
    Escalate,
    Feedback,
    RequestFailed,
    ResultReceived,
    Welcomed,
)
from shared import SigningKey

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


Answers = list[tuple[str, list[str]]]


async def ask(device: Device, rows: list[dict[str, Any]], prefix: str) -> Answers:
    out: Answers = []
    for i, row in enumerate(rows):
        await device.send(
            Escalate(
                request_id=f"{prefix}_{i}",
                # Earlier turns of the conversation, if the row has any, then the question.
                messages=[
                    *(ChatMessage(role=role, content=text) for role, text in row.get("turns", ())),
                    ChatMessage(role="user", content=row["text"]),
                ],
                deadline_ms=120_000,
                max_tokens=64,
            )
        )
        event = await device.next_event(ResultReceived, RequestFailed)
        ok = isinstance(event, ResultReceived)
        out.append((event.result.text, list(event.result.sources)) if ok else ("", []))  # type: ignore[union-attr]
    return out


async def play(
    rows: list[dict[str, Any]],
    kb: Path | None,
    teach: list[bool] | None = None,
    *,
    quote_facts: bool = True,
    context_turns: int = 2,
    context_drift: float = 0.1,
) -> tuple[Answers, Answers]:
    """Answers to `rows`; with `teach`, feedback on the rows marked True, then the answers to
    all rows asked again."""
    with tempfile.TemporaryDirectory() as tmp:
        config = CloudConfig.model_validate(
            {"data_dir": Path(tmp), "port": 0, "admin_port": 0, "knowledge": kb,
             "store_name": "Northwind Outfitters", "quote_facts": quote_facts,
             "knowledge_context_turns": context_turns,
             "knowledge_context_drift": context_drift}
        )  # fmt: skip
        service = await CloudService.create(config)
        await service.start()
        try:
            token = await service.store.create_enrollment_token()
            url = f"ws://127.0.0.1:{service.port}/v1"
            device = await Device.connect(url, EnrollmentCredentials(token, SigningKey.generate()))
            assert isinstance(await device.next_event(Welcomed), Welcomed)
            first = await ask(device, rows, "req")
            again: Answers = []
            if teach is not None:
                facts = {f.id: f.text for f in load_facts(kb)} if kb else {}
                for i, ((text, _), row, taught) in enumerate(zip(first, rows, teach, strict=True)):
                    if not taught:
                        continue
                    right = contains_expected(text, row["expect"])
                    await device.send(
                        Feedback(
                            idempotency_key=f"fb_{i}", request_id=f"req_{i}",
                            rating="positive" if right else "negative",
                            correction=None if right else facts.get(row["fact"]),
                        )
                    )  # fmt: skip
                    assert isinstance(await device.next_event(AckReceived), AckReceived)
                again = await ask(device, rows, "again")
            await device.close()
        finally:
            await service.stop()
    return first, again


def taught(row: dict[str, Any]) -> bool:
    return hashlib.sha256(row["text"].encode()).digest()[0] % 2 == 0


async def main_async(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in args.workload.read_text().splitlines() if line.strip()]
    facts = [r for r in rows if r["class"] == "learnable_fact"]
    kb = KnowledgeBase.from_file(args.kb)
    hits = sum(
        1 for r in facts if (b := kb.search(r["text"]).best) is not None and b.id == r["fact"]
    )
    teach = [taught(r) for r in facts]
    ours, again = await play(facts, args.kb, teach)
    alone, _ = await play(facts, None)
    phrased, _ = await play(facts, args.kb, quote_facts=False)
    right = sum(
        contains_expected(text, r["expect"]) for (text, _), r in zip(ours, facts, strict=True)
    )
    quoted = [
        (text, r) for (text, sources), r in zip(ours, facts, strict=True)
        if len(sources) == 1 and text and any(f.text == text for f in kb.facts.values())
    ]  # fmt: skip
    grounded = len(quoted)
    # A quoted fact is said with confidence: a wrong one misleads more than a vague answer.
    wrong_quotes = sum(1 for text, r in quoted if not contains_expected(text, r["expect"]))
    base, by_llm = (
        sum(contains_expected(text, r["expect"]) for (text, _), r in zip(run, facts, strict=True))
        for run in (alone, phrased)
    )
    n = len(facts)
    print(f"{n} learnable_fact requests through the cloud server (embedded SmolLM2-135M Q4_1)\n")
    print(f"retrieval hit rate (right fact ranked first): {hits}/{n} = {hits / n:.1%}")
    print(f"answered from a grounded fact:                {grounded}/{n} = {grounded / n:.1%}")
    print(f"  of which the wrong fact:                    {wrong_quotes}/{grounded}")
    share = f"{right}/{n} = {right / n:.1%}"
    print(f"answers holding every expected group:         {share} (target >= 95%)")
    print(f"baseline, same model without knowledge:       {base}/{n} = {base / n:.1%}")
    print(f"quote_facts off, the model phrases every answer: {by_llm}/{n} = {by_llm / n:.1%}")
    print("\none round of feedback on half of the questions, then all asked again:")
    for label, half in (("rated", True), ("not rated", False)):
        pairs = [
            (a, b, r) for a, b, r, t in zip(ours, again, facts, teach, strict=True) if t == half
        ]
        before = sum(contains_expected(a[0], r["expect"]) for a, _, r in pairs)
        after = sum(contains_expected(b[0], r["expect"]) for _, b, r in pairs)
        m = len(pairs)
        print(f"  {label:<10} {before}/{m} = {before / m:.1%} -> {after}/{m} = {after / m:.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workload", type=Path, default=SHARED / "northwind-workload-dev.jsonl")
    parser.add_argument("--kb", type=Path, default=SHARED / "northwind-kb.md")
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
