"""Follow-up questions: does the cloud answer "How much per day?" after "Do you rent out tents?"

Plays 42 short conversations (`examples/kiosk/northwind-followups.jsonl`: a first question about
a store fact and a brief answer, in 10 of them a follow-up and its brief answer too, then
another request) through a `CloudService` with the packaged SmolLM2 model and the store's
knowledge base, as `bench.cloud_facts` does:

- 25 follow-ups on store facts (`fact` names it): 23 name their topic only in the turns before
  (5 of them after a follow-up already), 2 change the subject and name their own. Reported: the
  share of answers that contain every expected group, with how many were answered from a
  grounded fact and how many of those quoted the wrong one;
- 17 new open requests (`fact` is null: "Compare three-season and four-season tents" after a
  shipping question), which no fact answers. Reported: how many were answered without quoting
  a fact (a quote here is the earlier turns' fact, the wrong answer).

In the same run, for contrast:

- the same without telling a new subject apart (`knowledge_context_drift = 2`: a request is
  always looked up with the turn before when it ties to no fact alone);
- looked up with the one turn before only (`knowledge_context_turns = 1`, the default until
  2026-11-29);
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
    pairs = [(text, r) for (text, _), r in zip(answers, rows, strict=True)]
    on_facts = [(text, r) for text, r in pairs if r["fact"] is not None]
    right = sum(contains_expected(text, r["expect"]) for text, r in on_facts)
    quoted = [(text, r) for text, r in on_facts if text in facts.values()]
    wrong = sum(1 for text, r in quoted if text != facts[r["fact"]])
    n = len(on_facts)
    new = [text for text, r in pairs if r["fact"] is None]
    unquoted = sum(1 for text in new if text not in facts.values())
    return (
        f"{right:>2}/{n} = {right / n:6.1%}   quoted a fact {len(quoted):>2}, the wrong one "
        f"{wrong}   new requests not answered with a fact {unquoted:>2}/{len(new)}"
    )


async def main_async(args: argparse.Namespace) -> None:
    rows = read_jsonl(args.conversations, required=("turns", "text", "fact", "expect"))
    facts = {f.id: f.text for f in load_facts(args.kb)}
    ours, _ = await play(rows, args.kb)
    unchecked, _ = await play(rows, args.kb, context_drift=2.0)
    one_turn, _ = await play(rows, args.kb, context_turns=1)
    question_only, _ = await play(rows, args.kb, context_turns=0)
    alone, _ = await play([{**r, "turns": []} for r in rows], args.kb)
    print(f"{len(rows)} conversations through the cloud server (embedded SmolLM2-135M Q4_1)")
    print("follow-ups on facts: answers holding every expected group; new open requests:\n")
    for label, answers in (
        ("with the conversation, looked up with 2 turns before", ours),
        ("  same, a new subject not told apart (drift 2)", unchecked),
        ("  same, with the one turn before only", one_turn),
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
