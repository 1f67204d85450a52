"""The distillation dataset: what the cloud answered, as the users judged it.

From the store: escalations that ended with an answer; negative feedback drops an answer, a
correction replaces it; by default only trusted answers are kept (quoted from a knowledge
fact, rated positive, or corrected: unrated free text from the LLM is not what a device should
learn); questions are deduplicated (a correction wins over a rated answer, a rated one over an
unrated one); a question asked after earlier turns of a conversation is left out (an example
is one question alone, and its answer may rest on those turns); a held-out share is split off
by a hash of the question, so the split does not move when more data arrives. The builder
refuses to produce a dataset that holds any raw personal value (placeholders such as
``<PHONE_1>`` are fine): the store should never hold one, and a training set is where a leak
would become permanent.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from cloud_agent.config import PHONE_REGIONS
from cloud_agent.errors import CloudAgentError
from cloud_agent.store import InteractionRecord, Store
from shared.files import read_jsonl
from shared.pii import detect

__all__ = [
    "Dataset",
    "Example",
    "PrivateDataError",
    "build_dataset",
    "examples_from_interactions",
    "expectations_from_workload",
    "normalise",
]

Source = Literal["answer", "correction", "paraphrase", "replay"]
_RANK = {"correction": 3, "positive": 2, None: 1}


class PrivateDataError(CloudAgentError):
    """A raw personal value was found in data meant for training. Nothing was built."""


@dataclass(frozen=True, slots=True)
class Example:
    question: str
    answer: str
    source: Source = "answer"
    fact_ids: tuple[str, ...] = ()
    request_id: str | None = None
    expect: tuple[tuple[str, ...], ...] = ()
    """Answer groups that must appear (from a labelled workload); empty when unknown."""


@dataclass(frozen=True)
class Dataset:
    train: list[Example]
    heldout: list[Example]
    dropped: dict[str, int] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        with path.open("w", encoding="utf-8") as fh:
            for split, items in (("train", self.train), ("heldout", self.heldout)):
                for example in items:
                    fh.write(json.dumps({"split": split, **asdict(example)}) + "\n")


def normalise(text: str) -> str:
    """Lower case, words only: the key under which questions are deduplicated."""
    return " ".join(re.findall(r"[\w$%:.,'-]+", text.lower())).strip(" .,?!")


def _heldout(question: str, share: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{normalise(question)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def examples_from_interactions(
    records: Iterable[InteractionRecord], *, trusted_only: bool = True
) -> tuple[list[Example], dict[str, int]]:
    """One example per distinct question, chosen by the users' feedback."""
    best: dict[str, tuple[int, Example]] = {}
    dropped = {"no_answer": 0, "follow_up": 0, "negative": 0, "untrusted": 0, "duplicate": 0}
    for record in records:
        if record.status != "ok" or not record.question or not (record.answer or record.correction):
            dropped["no_answer"] += 1
            continue
        if record.follows_up:
            # Its answer may rest on the earlier turns, and an example is one question alone.
            dropped["follow_up"] += 1
            continue
        if record.correction:
            answer, source, rank = record.correction, "correction", _RANK["correction"]
        elif record.rating == "negative":
            dropped["negative"] += 1
            continue
        else:
            answer, source, rank = record.answer or "", "answer", _RANK.get(record.rating, 1)
        trusted = record.backend == "knowledge" or rank > 1  # quoted fact, thumbs up, corrected
        if trusted_only and not trusted:
            dropped["untrusted"] += 1
            continue
        example = Example(
            question=record.question,
            answer=answer.strip(),
            source=source,  # type: ignore[arg-type]
            fact_ids=tuple(record.fact_ids),
            request_id=record.request_id,
        )
        key = normalise(example.question)
        if key in best:
            dropped["duplicate"] += 1
            if best[key][0] >= rank:
                continue
        best[key] = (rank, example)
    return [example for _, example in best.values()], dropped


def private_kinds(example: Example, *, phone_regions: tuple[str, ...] = PHONE_REGIONS) -> set[str]:
    """The kinds of raw personal data in an example's question and answer."""
    text = f"{example.question}\n{example.answer}"
    return {f.kind.value for f in detect(text, phone_regions=phone_regions)}


def check_private(
    examples: Sequence[Example], *, phone_regions: tuple[str, ...] = PHONE_REGIONS
) -> None:
    """`PrivateDataError` naming the requests and kinds (never the values) of any raw PII."""
    found = []
    for example in examples:
        kinds = private_kinds(example, phone_regions=phone_regions)
        if kinds:
            found.append(f"{example.request_id or example.question[:20]!r}: {sorted(kinds)}")
    if found:
        raise PrivateDataError(
            f"refusing to build a training set: raw personal data in {len(found)} example(s): "
            + "; ".join(found[:5])
        )


def expectations_from_workload(path: Path) -> dict[str, tuple[tuple[str, ...], ...]]:
    """normalised question -> `expect` groups, from a labelled workload file (JSON lines)."""
    return {
        normalise(row["text"]): tuple(tuple(g) for g in row["expect"])
        for row in read_jsonl(path, required=("text",))
        if row.get("expect")
    }


def split(
    examples: Sequence[Example], *, heldout_share: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    train = [e for e in examples if not _heldout(e.question, heldout_share, seed)]
    heldout = [e for e in examples if _heldout(e.question, heldout_share, seed)]
    return train, heldout


async def build_dataset(
    store: Store,
    *,
    heldout_share: float = 0.2,
    seed: int = 0,
    trusted_only: bool = True,
    expectations: dict[str, tuple[tuple[str, ...], ...]] | None = None,
    limit: int = 100_000,
    phone_regions: tuple[str, ...] = PHONE_REGIONS,
) -> Dataset:
    """The dataset from the store's interactions and feedback (see the module's docstring)."""
    records = await store.list_interactions(limit=limit)
    examples, dropped = examples_from_interactions(records, trusted_only=trusted_only)
    check_private(examples, phone_regions=phone_regions)
    if expectations:
        examples = [
            Example(**{**asdict(e), "expect": expectations.get(normalise(e.question), ())})
            for e in examples
        ]
    train, heldout = split(examples, heldout_share=heldout_share, seed=seed)
    return Dataset(train, heldout, dropped)
