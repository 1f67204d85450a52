"""Is the cloud right on store facts? Measured through the real server with the embedded model.

Plays the workload's `learnable_fact` requests through a `CloudService` with the packaged
SmolLM2 model and the store's knowledge base, and reports the share of answers that contain
every expected group (target: at least 95%), next to the retrieval hit rate (the right fact
ranked first) and the share answered from a grounded fact. Baseline in the same run: the
embedded model alone, with no knowledge base.

    python -m bench.cloud_facts [--workload PATH] [--kb PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from cloud_agent.config import CloudConfig
from cloud_agent.evaluation import contains_expected
from cloud_agent.knowledge import KnowledgeBase
from cloud_agent.service import CloudService
from examples.handshake import Device
from protocol import (
    ChatMessage,
    EnrollmentCredentials,
    Escalate,
    RequestFailed,
    ResultReceived,
    Welcomed,
)
from shared import SigningKey

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


async def play(rows: list[dict[str, Any]], kb: Path | None) -> list[tuple[str, list[str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        config = CloudConfig.model_validate(
            {"data_dir": Path(tmp), "port": 0, "admin_port": 0, "knowledge": kb,
             "store_name": "Northwind Outfitters"}
        )  # fmt: skip
        service = await CloudService.create(config)
        await service.start()
        out: list[tuple[str, list[str]]] = []
        try:
            token = await service.store.create_enrollment_token()
            url = f"ws://127.0.0.1:{service.port}/v1"
            device = await Device.connect(url, EnrollmentCredentials(token, SigningKey.generate()))
            assert isinstance(await device.next_event(Welcomed), Welcomed)
            for i, row in enumerate(rows):
                await device.send(
                    Escalate(
                        request_id=f"req_{i}",
                        messages=[ChatMessage(role="user", content=row["text"])],
                        deadline_ms=120_000,
                        max_tokens=64,
                    )
                )
                event = await device.next_event(ResultReceived, RequestFailed)
                if isinstance(event, ResultReceived):
                    out.append((event.result.text, list(event.result.sources)))
                else:
                    out.append(("", []))
            await device.close()
        finally:
            await service.stop()
    return out


async def main_async(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in args.workload.read_text().splitlines() if line.strip()]
    facts = [r for r in rows if r["class"] == "learnable_fact"]
    kb = KnowledgeBase.from_file(args.kb)
    hits = sum(
        1 for r in facts if (b := kb.search(r["text"]).best) is not None and b.id == r["fact"]
    )
    ours = await play(facts, args.kb)
    alone = await play(facts, None)
    right = sum(
        contains_expected(text, r["expect"]) for (text, _), r in zip(ours, facts, strict=True)
    )
    grounded = sum(1 for text, sources in ours if len(sources) == 1 and text and any(
        f.text == text for f in kb.facts.values()))  # fmt: skip
    base = sum(
        contains_expected(text, r["expect"]) for (text, _), r in zip(alone, facts, strict=True)
    )
    n = len(facts)
    print(f"{n} learnable_fact requests through the cloud server (embedded SmolLM2-135M Q4_1)\n")
    print(f"retrieval hit rate (right fact ranked first): {hits}/{n} = {hits / n:.1%}")
    print(f"answered from a grounded fact:                {grounded}/{n} = {grounded / n:.1%}")
    share = f"{right}/{n} = {right / n:.1%}"
    print(f"answers holding every expected group:         {share} (target >= 95%)")
    print(f"baseline, same model without knowledge:       {base}/{n} = {base / n:.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workload", type=Path, default=SHARED / "northwind-workload-dev.jsonl")
    parser.add_argument("--kb", type=Path, default=SHARED / "northwind-kb.md")
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
