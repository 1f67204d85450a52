"""Knowledge files, hybrid retrieval (FTS5 words + embeddings), and the grounding decision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cloud_agent.backends import ChatTurn
from cloud_agent.errors import KnowledgeError
from cloud_agent.knowledge import Fact, KnowledgeBase, load_facts
from cloud_agent.skills import KnowledgeSkill, is_question
from cloud_agent.store import InteractionRecord


def test_markdown_bullets_become_facts(kb_path: Path) -> None:
    facts = load_facts(kb_path)
    assert len(facts) == 20
    assert facts[0].id == "returns" and facts[0].text.startswith("Items can be returned")


def test_jsonl_knowledge_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "kb.jsonl"
    path.write_text(
        '{"id": "hours", "text": "Open 9 to 5."}\n\n{"id": "dogs", "text": "Dogs welcome."}\n'
    )
    assert [f.id for f in load_facts(path)] == ["hours", "dogs"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.md", "# nothing here\n", "holds no facts"),
        ("dup.md", "- [a] one\n- [a] two\n", "duplicate fact ids"),
        ("bad.jsonl", '{"id": "x"}\n', "expected"),
    ],
)
def test_bad_knowledge_files_raise_knowledge_error(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(KnowledgeError, match=message):
        load_facts(path)
    with pytest.raises(KnowledgeError, match="cannot read"):
        load_facts(tmp_path / "absent.md")


def test_search_ranks_the_fact_that_answers_first(kb_path: Path) -> None:
    kb = KnowledgeBase.from_file(kb_path)
    result = kb.search("How much does express shipping cost?")
    assert result.best is not None and result.best.id == "express"
    assert result.scores == tuple(sorted(result.scores, reverse=True))
    assert kb.search("the of and").facts == ()


@pytest.mark.parametrize(
    ("question", "fact_id"),
    [
        ("Can I bring my puppy?", "dogs"),
        ("Where do I leave the car?", "parking"),
        ("Is there internet access?", "wifi"),
    ],
)
def test_paraphrases_sharing_no_word_with_the_fact_are_found_by_meaning(
    question: str, fact_id: str
) -> None:
    kb = KnowledgeBase(
        [
            Fact("parking", "Free parking is available behind the store."),
            Fact("dogs", "Dogs on a leash are welcome inside."),
            Fact("wifi", "Guest wifi is free; the password is on the receipt."),
        ]
    )
    result = kb.search(question)
    assert result.best is not None and result.best.id == fact_id
    assert result.coverage == 0.0 and result.similarity > 0.2 and result.confidence > 0


class NoMeaning:
    """Embedder double: every text gets the same vector, so only words rank facts."""

    def embed(self, texts: list[str]) -> np.ndarray:  # type: ignore[type-arg]
        return np.ones((len(texts), 4), dtype=np.float32) / 2


@pytest.mark.parametrize(
    ("question", "fact_id"),
    [
        ("Besides cards, how else can I pay?", "payment"),  # pay ~ payment
        ("What do members get?", "tiers"),  # members ~ membership
        ("Can I rent one?", "rental"),  # rent ~ rental
    ],
)
def test_words_match_across_their_derived_forms(question: str, fact_id: str) -> None:
    kb = KnowledgeBase(
        [
            Fact("payment", "We take Visa and Mastercard for payment."),
            Fact("gift", "Gift cards never expire and are sold at every till."),
            Fact("tiers", "Our membership has three tiers."),
            Fact("rental", "Tents are available for rental by the day."),
        ],
        NoMeaning(),
    )
    result = kb.search(question)
    assert result.best is not None and result.best.id == fact_id


def test_retrieval_hit_rate_on_the_dev_workload(kb_path: Path, workload_path: Path) -> None:
    """Words and meaning together find the right fact for at least 92.5% of the paraphrases
    (words alone: 90%); the figure is printed so a regression shows."""
    kb = KnowledgeBase.from_file(kb_path)
    rows = [json.loads(line) for line in workload_path.read_text().splitlines() if line.strip()]
    facts = [r for r in rows if r["class"] == "learnable_fact"]
    hits = sum(
        1 for r in facts if (b := kb.search(r["text"]).best) is not None and b.id == r["fact"]
    )
    print(f"retrieval hit rate: {hits}/{len(facts)} = {hits / len(facts):.1%}")
    assert hits / len(facts) >= 0.925


def test_grounding_quotes_the_fact_only_for_confident_covered_short_questions(
    kb_path: Path,
) -> None:
    skill = KnowledgeSkill(KnowledgeBase.from_file(kb_path))
    plan = skill.plan([ChatTurn("user", "Is shipping free?")])
    assert plan.grounded_answer is not None and "$75" in plan.grounded_answer
    assert plan.fact_ids == ("free-shipping",)
    plan = skill.plan([ChatTurn("user", "My hiking boots are too small, can I exchange them?")])
    assert plan.grounded_answer is not None and "60 days" in plan.grounded_answer
    assert_left_to_the_llm(
        skill,
        "Compare three stoves for winter camping in detail.",
        "Recommend climbing shoes for a beginner with wide feet and explain sizing.",
        "Explain how to read a topographic map for planning a ridge walk.",
    )


def test_with_quoting_off_every_answer_is_left_to_the_llm_with_the_facts(kb_path: Path) -> None:
    kb = KnowledgeBase.from_file(kb_path)
    plan = KnowledgeSkill(kb, quote_facts=False).plan([ChatTurn("user", "Is shipping free?")])
    assert plan.grounded_answer is None and plan.fact_ids[0] == "free-shipping"
    assert "$75" in plan.messages[0].content and plan.messages[0].content.count("\n- ") == 3
    plan = KnowledgeSkill(kb, quote_facts=False, top_k=1).plan(
        [ChatTurn("user", "Is shipping free?")]
    )
    assert plan.fact_ids == ("free-shipping",) and plan.messages[0].content.count("\n- ") == 1


def assert_left_to_the_llm(skill: KnowledgeSkill, *requests: str) -> None:
    """Each request goes to the LLM as written, under the system prompt, with no quoted fact."""
    for request in requests:
        plan = skill.plan([ChatTurn("user", request)])
        assert plan.grounded_answer is None, request
        assert plan.messages[0].role == "system" and plan.messages[-1].content == request


def test_questions_are_grounded_on_a_looser_match_than_tasks(kb_path: Path) -> None:
    skill = KnowledgeSkill(KnowledgeBase.from_file(kb_path))
    question = "Until what time can I phone support?"
    plan = skill.plan([ChatTurn("user", question)])
    assert plan.retrieval.similarity < skill.min_similarity, "a paraphrase far from the fact"
    assert plan.grounded_answer is not None and "21:00" in plan.grounded_answer
    # The same words as a task are left to the LLM (with the fact in its prompt).
    plan = skill.plan([ChatTurn("user", "Tell me until what time I can phone support.")])
    assert plan.grounded_answer is None and "21:00" in plan.messages[0].content
    # A question whose best fact is not clearly ahead is not grounded either.
    plan = skill.plan([ChatTurn("user", EARLY_CALL)])
    assert plan.retrieval.confidence < skill.question_margin and plan.grounded_answer is None


def test_requests_carrying_personal_data_are_not_grounded(kb_path: Path) -> None:
    skill = KnowledgeSkill(KnowledgeBase.from_file(kb_path))
    # The LLM sees the placeholders as written.
    assert_left_to_the_llm(
        skill,
        "Refund me to IBAN <IBAN_1>",
        "Is my card <CARD_1> still saved on my account?",
        "Is shipping free to <ADDRESS_1>?",
    )
    # Without the placeholder the same question is grounded: only its presence differs.
    assert skill.plan([ChatTurn("user", "Is shipping free?")]).grounded_answer is not None
    # A placeholder's label is not a word of the question ("CARD" is not about gift cards).
    plan = skill.plan([ChatTurn("user", "What about <CARD_1>?")])
    assert plan.retrieval.facts == () and plan.fact_ids == ()


def test_commands_sharing_a_word_with_a_fact_are_not_answered_with_it(kb_path: Path) -> None:
    # Kiosk commands that reach the cloud (a third-party agent, another router) share words
    # with facts ("card", "go back", "no") without asking for them.
    skill = KnowledgeSkill(KnowledgeBase.from_file(kb_path))
    commands = ("Scan my member card", "Go back to the home screen", "No thanks")
    assert all(skill.kb.search(c).coverage >= skill.min_coverage for c in commands)
    assert_left_to_the_llm(skill, *commands)
    # Asked as a question, shared words are evidence.
    plan = skill.plan([ChatTurn("user", "Which payment methods do you accept?")])
    assert plan.retrieval.similarity < skill.min_similarity and plan.grounded_answer is not None


def test_the_caller_can_mark_a_request_personal(kb_path: Path) -> None:
    skill = KnowledgeSkill(KnowledgeBase.from_file(kb_path))
    assert skill.plan([ChatTurn("user", "Is shipping free?")]).grounded_answer is not None
    plan = skill.plan([ChatTurn("user", "Is shipping free?")], personal=True)
    assert plan.grounded_answer is None and "$75" in plan.messages[0].content


@pytest.mark.parametrize(
    ("text", "asks"),
    [
        ("Until what time can I phone support?", True),
        ("what's the return window", True),
        ("Do you price match", True),
        ("My boots are too small, can I swap them?", True),
        ("Explain how to read a topographic map.", False),
        ("Write a haiku about a misty morning campsite.", False),
        ("Whatever you recommend, keep it short", False),
    ],
)
def test_is_question(text: str, asks: bool) -> None:
    assert is_question(text) is asks


def test_unrelated_facts_stay_out_of_the_prompt(kb_path: Path) -> None:
    skill = KnowledgeSkill(KnowledgeBase.from_file(kb_path))
    plan = skill.plan([ChatTurn("user", "Write a short poem about autumn rain.")])
    assert plan.retrieval.facts, "embeddings always rank something"
    assert plan.grounded_answer is None and plan.fact_ids == ()
    assert "Store facts" not in plan.messages[0].content
    plan = skill.plan([ChatTurn("user", "Is renting a tent for 4 weekends cheaper than buying?")])
    assert "$18 per day" in plan.messages[0].content and "rental" in plan.fact_ids


HOTLINE = "The support hotline is open from 7:30 to 21:00, every day of the week."
EARLY_CALL = "Can I call customer service early in the morning?"


def test_a_learned_question_finds_its_fact_and_moves_when_relearned(kb_path: Path) -> None:
    kb = KnowledgeBase.from_file(kb_path)
    before = kb.search(EARLY_CALL).best
    assert before is not None and before.id != "hotline", "the case must start out wrong"
    assert kb.learn("Can I ring customer service before work?", "hotline")
    assert not kb.learn("can I ring customer service before work", "hotline"), "same question"
    found = kb.search(EARLY_CALL)
    assert found.best is not None and found.best.id == "hotline"
    assert kb.learn("Can I ring customer service before work?", "cancel")
    assert kb.learned == 1
    moved = kb.search("Can I ring customer service before work?")
    assert moved.best is not None and moved.best.id == "cancel"
    with pytest.raises(KnowledgeError, match="no fact"):
        kb.learn(EARLY_CALL, "no-such-fact")


def test_a_correction_is_matched_to_the_fact_it_states(kb_path: Path) -> None:
    kb = KnowledgeBase.from_file(kb_path)
    fact = kb.fact_quoted_by(f"Sorry! {HOTLINE.upper()[:-1]}")
    assert fact is not None and fact.id == "hotline"
    assert kb.fact_quoted_by("We open at half past seven.") is None


def _record(**kw: object) -> InteractionRecord:
    fields: dict[str, object] = {
        "id": 1, "device_id": "dev_1", "request_id": "req_1", "created_at": None,
        "messages": [{"role": "user", "content": EARLY_CALL}], "placeholders": [],
        "answer": "Orders can be cancelled within 30 minutes.", "status": "ok",
        "error_name": None, "intent": None, "route_reasons": [], "latency_ms": 1,
        "prompt_tokens": 0, "completion_tokens": 0, "backend": "knowledge",
        "model": "knowledge", "fact_ids": ["cancel"], "rating": "negative", "correction": None,
    }  # fmt: skip
    fields.update(kw)
    return InteractionRecord(**fields)  # type: ignore[arg-type]


def test_the_skill_learns_from_fact_corrections_and_confirmed_quotes_only(kb_path: Path) -> None:
    skill = KnowledgeSkill(KnowledgeBase.from_file(kb_path))
    assert not skill.learn(_record()), "a thumbs-down alone names no fact"
    assert not skill.learn(_record(correction="Call us at half past seven.")), "free text"
    assert not skill.learn(_record(rating="positive", backend="scripted", answer="Yes, 7:30."))
    assert skill.kb.learned == 0
    assert skill.learn(_record(correction=HOTLINE))
    plan = skill.plan([ChatTurn("user", EARLY_CALL)])
    assert plan.grounded_answer == HOTLINE and plan.fact_ids == ("hotline",)
    rental = "Tents can be rented for $18 per day with a $100 refundable deposit."
    confirmed = _record(
        messages=[{"role": "user", "content": "Could I borrow a tent for the weekend?"}],
        answer=rental, fact_ids=["rental"], rating="positive",
    )  # fmt: skip
    assert skill.learn(confirmed) and skill.kb.learned == 2
