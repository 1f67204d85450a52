"""Follow-up questions: does the cloud answer "How much per day?" after "Do you rent out tents?"

Plays 20 short conversations (`examples/kiosk/northwind-followups.jsonl`: a first question about
a store fact, a brief answer, then a follow-up; 18 of the follow-ups name their topic only in the
turn before, 2 change the subject and name their own) through a `CloudService` with the packaged
SmolLM2 model and the store's knowledge base, as `bench.cloud_facts` does, and reports the
share of follow-up answers that contain every expected group, with how many were answered from a
grounded fact and how many of those quoted the wrong one. In the same run, for contrast:

- the conversation with retrieval over the follow-up alone (`knowledge_context_turns = 0`, as
  the cloud looked facts up before it read earlier turns);
- the follow-up asked alone, as a kiosk that keeps no conversation would send it.

    python -m bench.cloud_followups [--conversations PATH] [--kb PATH]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from bench.cloud_facts import SHARED, Answers, play
from cloud_agent.evaluation import contains_expected
from cloud_agent.knowledge import load_facts
from shared.files import read_jsonl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "kiosk"


def score(answers: Answers, rows: list[dict[str, Any]], facts: dict[str, str]) -> str:
    right = sum(
        contains_expected(text, r["expect"]) for (text, _), r in zip(answers, rows, strict=True)
    )
    quoted = [
        (text, r) for (text, _), r in zip(answers, rows, strict=True) if text in facts.values()
    ]
    wrong = sum(1 for text, r in quoted if text != facts[r["fact"]])
    n = len(rows)
    return (
        f"{right:>2}/{n} = {right / n:6.1%}   quoted a fact {len(quoted):>2}, the wrong one {wrong}"
    )


async def main_async(args: argparse.Namespace) -> None:
    rows = read_jsonl(args.conversations, required=("turns", "text", "fact", "expect"))
    facts = {f.id: f.text for f in load_facts(args.kb)}
    ours, _ = await play(rows, args.kb)
    question_only, _ = await play(rows, args.kb, context_turns=0)
    alone, _ = await play([{**r, "turns": []} for r in rows], args.kb)
    print(f"{len(rows)} follow-up questions through the cloud server (embedded SmolLM2-135M Q4_1)")
    print("answers holding every expected group:\n")
    for label, answers in (
        ("with the conversation, looked up with the turn before", ours),
        ("with the conversation, looked up by the question alone", question_only),
        ("the follow-up alone, no conversation", alone),
    ):
        print(f"  {label:<56} {score(answers, rows, facts)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--conversations", type=Path, default=EXAMPLES / "northwind-followups.jsonl"
    )
    parser.add_argument("--kb", type=Path, default=SHARED / "northwind-kb.md")
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
