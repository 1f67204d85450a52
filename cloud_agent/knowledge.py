"""Knowledge retrieval: a store's facts indexed in SQLite FTS5 and ranked by BM25.

A knowledge file is Markdown (one fact per bullet, ``- [fact-id] text``) or JSONL (one object
per line with ``id`` and ``text``). Each fact is indexed with its text and its id's words (so
``[free-shipping]`` matches "free shipping"), stemmed by FTS5's Porter tokenizer.

`KnowledgeBase.search` returns the best facts with a `confidence` in [0, 1] that says how
clearly the best fact beats the rest; the skill grounds its answer in the fact itself when that
confidence is high, because a tiny model restates facts unreliably.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cloud_agent.errors import KnowledgeError

__all__ = ["Fact", "KnowledgeBase", "Retrieval", "load_facts"]

_BULLET = re.compile(r"^\s*[-*]\s*\[(?P<id>[A-Za-z0-9][A-Za-z0-9._-]{0,63})\]\s*(?P<text>.+?)\s*$")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")

# Words that carry no topic: dropped from queries so BM25 ranks on what the question is about.
_STOPWORDS = frozenset(
    """a about am an and any are as at be been but by can could did do does doing for from get
    got had has have how i if in into is it its just me my of on or our please so than that the
    their them then there these they this to too us was we were what when where which who why
    will with would you your yours i'm it's what's don't can't""".split()
)


@dataclass(frozen=True, slots=True)
class Fact:
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class Retrieval:
    """Facts ranked for a query, best first, with BM25 scores (higher is better)."""

    facts: tuple[Fact, ...]
    scores: tuple[float, ...]
    confidence: float
    coverage: float = 0.0
    """Share of the query's content words that the best fact contains (after stemming)."""

    @property
    def best(self) -> Fact | None:
        return self.facts[0] if self.facts else None


def load_facts(path: str | Path) -> list[Fact]:
    """Read facts from a Markdown or JSONL knowledge file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KnowledgeError(f"cannot read knowledge file {path}: {exc.strerror}") from exc
    facts: list[Fact] = []
    if path.suffix in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                facts.append(Fact(str(obj["id"]), str(obj["text"]).strip()))
            except (ValueError, KeyError, TypeError) as exc:
                raise KnowledgeError(f"{path}:{lineno}: expected {{'id', 'text'}}") from exc
    else:
        facts = [
            Fact(m["id"], m["text"]) for line in text.splitlines() if (m := _BULLET.match(line))
        ]
    if not facts:
        raise KnowledgeError(f"{path} holds no facts (expected '- [id] text' bullets or JSONL)")
    ids = [f.id for f in facts]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise KnowledgeError(f"{path}: duplicate fact ids {dup}")
    return facts


class KnowledgeBase:
    """An in-process FTS5 index over a list of facts."""

    def __init__(self, facts: list[Fact]) -> None:
        self.facts = {f.id: f for f in facts}
        # check_same_thread=False: searches run from worker threads; the index is read-only
        # after construction, and sqlite3 serialises access to one connection.
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(
            "CREATE VIRTUAL TABLE facts USING fts5("
            "fact_id UNINDEXED, body, tags, tokenize='porter unicode61')"
        )
        self._db.executemany(
            "INSERT INTO facts(fact_id, body, tags) VALUES (?, ?, ?)",
            [(f.id, f.text, f.id.replace("-", " ").replace("_", " ")) for f in facts],
        )
        self._db.commit()

    @classmethod
    def from_file(cls, path: str | Path) -> KnowledgeBase:
        return cls(load_facts(path))

    def __len__(self) -> int:
        return len(self.facts)

    def search(self, query: str, limit: int = 3) -> Retrieval:
        terms = [w.lower() for w in _WORD.findall(query)]
        terms = [t for t in terms if t not in _STOPWORDS and len(t) > 1]
        if not terms:
            return Retrieval((), (), 0.0)
        match = " OR ".join(f'"{t}"' for t in dict.fromkeys(terms))
        # bm25() is lower-is-better; the tags column (the id's words) weighs double.
        rows = self._db.execute(
            "SELECT fact_id, -bm25(facts, 0.0, 1.0, 2.0) AS score FROM facts "
            "WHERE facts MATCH ? ORDER BY score DESC LIMIT ?",
            (match, max(limit, 2)),
        ).fetchall()
        if not rows:
            return Retrieval((), (), 0.0)
        facts = tuple(self.facts[r[0]] for r in rows[:limit])
        scores = tuple(float(r[1]) for r in rows[:limit])
        unique = list(dict.fromkeys(terms))
        covered = sum(
            1
            for term in unique
            if self._db.execute(
                "SELECT 1 FROM facts WHERE facts MATCH ? AND fact_id = ?", (f'"{term}"', rows[0][0])
            ).fetchone()
        )
        return Retrieval(
            facts, scores, _confidence([float(r[1]) for r in rows]), covered / len(unique)
        )


def _confidence(scores: list[float]) -> float:
    """How clearly the best score beats the runner-up, squashed into [0, 1]."""
    best = scores[0]
    if best <= 0:
        return 0.0
    runner = scores[1] if len(scores) > 1 else 0.0
    margin = (best - runner) / best  # 0 when tied, 1 when alone
    strength = 1.0 - math.exp(-best / 2.0)  # weak matches (one rare word) stay uncertain
    return round(margin * 0.5 + strength * 0.5, 4)
