"""Skills the cloud agent answers with. The first is knowledge retrieval.

`KnowledgeSkill.plan` looks the user's question up in the knowledge base. When retrieval is
confident, the answer is the fact itself (grounded: a tiny embedded model restates facts
unreliably, and quoting costs no tokens; `quote_facts=False` turns this off for a backend that
phrases well). Otherwise the best facts go into the system prompt and the LLM phrases the answer
or handles the open request.

`KnowledgeSkill.learn` takes feedback on an answer: a correction that states a fact, or a
positive rating of a quoted fact, attaches the question to that fact, so the same and similar
questions are answered from it next time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cloud_agent.backends.base import ChatTurn
from cloud_agent.knowledge import KnowledgeBase, Retrieval
from cloud_agent.store.records import InteractionRecord
from protocol import PLACEHOLDER

__all__ = ["KnowledgeSkill", "Plan", "is_question"]

SYSTEM = (
    "You are the assistant of {store}. Answer briefly and politely. Keep placeholders such as "
    "<CARD_1> exactly as written. When a store fact below answers the question, state its key "
    "value."
)


# How an information question opens ("Until what time...", "Can I..."); tasks open with a verb
# ("Explain...", "Recommend...", "Write...").
_QUESTION_OPENING = re.compile(
    r"^\s*(what|what's|whats|when|where|which|who|whose|why|how|until|is|are|am|was|can|could|"
    r"do|does|did|will|would|should|shall|may|might|have|has)\b",
    re.IGNORECASE,
)


def is_question(text: str) -> bool:
    """Whether `text` asks something (ends with a question mark or opens like a question)
    rather than asking for a task to be done."""
    return text.rstrip().endswith("?") or _QUESTION_OPENING.match(text) is not None


@dataclass(frozen=True, slots=True)
class Plan:
    """How to answer one request."""

    messages: tuple[ChatTurn, ...]
    """What to send to the LLM when `grounded_answer` is None."""
    grounded_answer: str | None
    """The answer itself, when retrieval is confident."""
    fact_ids: tuple[str, ...]
    retrieval: Retrieval


class KnowledgeSkill:
    """Retrieval-grounded answering over a `KnowledgeBase`."""

    def __init__(
        self,
        kb: KnowledgeBase,
        *,
        store_name: str = "the store",
        quote_facts: bool = True,
        ground_threshold: float = 0.05,
        min_similarity: float = 0.4,
        min_coverage: float = 0.3,
        max_query_terms: int = 12,
        top_k: int = 3,
        min_prompt_score: float = 0.2,
        question_margin: float = 0.1,
        question_similarity: float = 0.25,
        task_margin: float = 0.1,
        context_turns: int = 2,
        context_drift: float = 0.1,
    ) -> None:
        self.kb = kb
        self.store_name = store_name
        self.quote_facts = quote_facts
        """Whether a confident match is answered with the fact itself (`Plan.grounded_answer`);
        when False, every answer is left to the LLM, with the facts in its prompt."""
        self.ground_threshold = ground_threshold
        self.min_similarity = min_similarity
        self.min_coverage = min_coverage
        self.max_query_terms = max_query_terms
        self.top_k = top_k
        self.min_prompt_score = min_prompt_score
        """Facts scoring below this are unrelated to the question and stay out of the prompt
        (embeddings always rank something: on the dev workload every fact question's right fact
        scores at least 0.25; most facts ranked for open questions score less)."""
        self.question_margin = question_margin
        self.question_similarity = question_similarity
        """A short question (`is_question`) is grounded on a weaker match than a task: its best
        fact at least `question_margin` ahead and `question_similarity` close in meaning. Fact
        questions are often paraphrased far from the fact's words ("Until what time can I phone
        support?": cosine 0.25 to the hotline fact); open tasks that close are imperatives
        ("Explain how to read a topographic map...")."""
        self.task_margin = task_margin
        """A task (not a question) is grounded only with its best fact at least this far
        ahead: an open task on a topic the facts touch ("Tell me everything about tents, at
        great length") comes close in meaning to a fact on that topic without singling one
        out. No fact question of the dev workload is grounded as a task."""
        self.context_turns = context_turns
        """For a follow-up the question alone does not tie to a fact ("What about to
        Alaska?"), retrieval runs again over this many earlier user turns with it ("Is
        shipping free? What about to Alaska?"); 0 looks at the question alone. Two by
        default: a follow-up of a follow-up ("Do you rent tents?", "How much per day?", "Is
        there a deposit?") is still looked up with the turn that named its topic."""
        self.context_drift = context_drift
        """How far the question may pull that lookup away from the fact the earlier turns
        point to (its similarity to their best fact falling by more than this) before it is
        taken for a new subject and looked up alone. A follow-up adds little of its own ("How
        big is it?"); a new request names its own subject ("Compare three-season and
        four-season tents", after a shipping question), and the earlier fact would be the
        wrong answer to it. Measured on the 32 conversations of `bench.cloud_followups`:
        follow-ups fall by at most 0.06 (two that change to a fact of their own by 0.11 and
        0.12), new requests the earlier fact would have answered by 0.13 to 0.30."""

    def plan(self, conversation: list[ChatTurn], *, personal: bool = False) -> Plan:
        """How to answer `conversation`. `personal` says the request carried personal data
        (the caller's detector found some): like a request with placeholders, it is about the
        customer's own case and is never answered with a bare fact."""
        asked = [t.content for t in conversation if t.role == "user"] or [""]
        # A placeholder's label is not the customer's word ("<CARD_1>" is not about gift cards),
        # and a request carrying personal data is about the customer's own case, which no
        # store fact answers by itself: such requests are never grounded.
        question, placeholders = PLACEHOLDER.subn(" ", asked[-1])
        personal = personal or placeholders > 0
        retrieval = self.kb.search(question, limit=self.top_k)
        grounded = self._grounded(question, retrieval, personal)
        earlier = [PLACEHOLDER.sub(" ", t) for t in asked[-1 - self.context_turns : -1]]
        if earlier:
            # A follow-up may name its topic only in the turns before it ("How much does that
            # cost?" after a question about zippers): looked up again with them, unless the
            # question pulls that lookup away from where the turns alone point (a new
            # subject). When the two lookups quote different facts, neither is sure enough to
            # be the answer.
            joined = self.kb.search("\n".join([*earlier, question]), limit=self.top_k)
            quoted = self._grounded(question, joined, personal)
            if grounded is None and self._follows(earlier, joined):
                retrieval, grounded = joined, quoted
            elif grounded is not None and quoted not in (None, grounded):
                retrieval = joined if self._follows(earlier, joined) else retrieval
                grounded = None
        system = SYSTEM.format(store=self.store_name)
        related = [
            f for f, score in zip(retrieval.facts, retrieval.scores, strict=True)
            if score >= self.min_prompt_score
        ]  # fmt: skip
        if related:
            system += "\n\nStore facts:\n" + "\n".join(f"- {f.text}" for f in related)
        # The caller's own instructions (a third-party agent's "Answer in French") follow ours
        # in the one system message: chat templates take one, at the start.
        theirs = [
            t.content.strip() for t in conversation if t.role == "system" and t.content.strip()
        ]
        if theirs:
            system += "\n\nInstructions from the caller:\n" + "\n".join(theirs)
        history = tuple(t for t in conversation if t.role != "system")
        return Plan(
            messages=(ChatTurn("system", system), *history),
            grounded_answer=grounded,
            fact_ids=tuple(f.id for f in retrieval.facts[:1] if grounded)
            or tuple(f.id for f in related),
            retrieval=retrieval,
        )

    def _follows(self, earlier: list[str], joined: Retrieval) -> bool:
        """Whether the lookup of the question with the `earlier` turns stays near the fact the
        turns alone point to (`context_drift`): a follow-up, not a new subject."""
        before = self.kb.search("\n".join(earlier), limit=1)
        return joined.similarity >= before.similarity - self.context_drift

    def _grounded(self, question: str, retrieval: Retrieval, personal: bool) -> str | None:
        """The best fact's text, when it answers `question` by itself (see `plan`)."""
        # Open questions share a word or two with facts without asking for one ("three stoves"
        # is not about the three loyalty tiers): ground only short requests whose best fact is
        # ahead of the rest and close in meaning, or, for a question, close in words (a
        # command that shares a word with a fact, "Scan my member card", does not ask for the
        # gift card fact) or clearly ahead and near in meaning. The rest goes to the LLM with
        # the facts in its prompt.
        short = len(question.split()) <= self.max_query_terms
        asks = is_question(question)
        close = retrieval.confidence >= self.ground_threshold and (
            retrieval.similarity >= self.min_similarity
            or (asks and retrieval.coverage >= self.min_coverage)
        )
        asked = (
            asks
            and retrieval.confidence >= self.question_margin
            and retrieval.similarity >= self.question_similarity
        )
        return (
            retrieval.best.text
            if self.quote_facts and retrieval.best is not None and short and not personal
            and (close or asked) and (asks or retrieval.confidence >= self.task_margin)
            else None
        )  # fmt: skip

    def learn(self, record: InteractionRecord) -> bool:
        """Learn from the feedback on one answered interaction; True if the index changed.

        A correction teaches the fact it states (an associate picking the right fact); a
        positive rating teaches the fact the answer quoted. Anything else teaches nothing:
        free-text corrections reach the device through distillation instead. A question asked
        after earlier turns ("And on Sundays?") teaches nothing: its words may not be what the
        fact answers, only with the turns before them."""
        question = PLACEHOLDER.sub(" ", record.question).strip()
        if not question or record.follows_up:
            return False
        fact = None
        if record.correction:
            fact = self.kb.fact_quoted_by(record.correction)
        elif record.rating == "positive" and record.answer and len(record.fact_ids) == 1:
            quoted = self.kb.facts.get(record.fact_ids[0])
            fact = quoted if quoted is not None and quoted.text == record.answer else None
        return fact is not None and self.kb.learn(question, fact.id)
