"""Knowledge files, hybrid retrieval (FTS5 words + embeddings), and the grounding decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_agent.backends import ChatTurn
from cloud_agent.errors import KnowledgeError
from cloud_agent.knowledge import Fact, KnowledgeBase, load_facts
from cloud_agent.skills import KnowledgeSkill


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


def test_retrieval_hit_rate_on_the_dev_workload(kb_path: Path, workload_path: Path) -> None:
    """Words and meaning together find the right fact for at least 90% of the paraphrases
    (words alone: 86%); the figure is printed so a regression shows."""
    kb = KnowledgeBase.from_file(kb_path)
    rows = [json.loads(line) for line in workload_path.read_text().splitlines() if line.strip()]
    facts = [r for r in rows if r["class"] == "learnable_fact"]
    hits = sum(
        1 for r in facts if (b := kb.search(r["text"]).best) is not None and b.id == r["fact"]
    )
    print(f"retrieval hit rate: {hits}/{len(facts)} = {hits / len(facts):.1%}")
    assert hits / len(facts) >= 0.9


def test_grounding_quotes_the_fact_only_for_confident_covered_short_questions(
    kb_path: Path,
) -> None:
    skill = KnowledgeSkill(KnowledgeBase.from_file(kb_path))
    plan = skill.plan([ChatTurn("user", "Is shipping free?")])
    assert plan.grounded_answer is not None and "$75" in plan.grounded_answer
    assert plan.fact_ids == ("free-shipping",)
    plan = skill.plan([ChatTurn("user", "My hiking boots are too small, can I exchange them?")])
    assert plan.grounded_answer is not None and "60 days" in plan.grounded_answer
    for open_question in (
        "Compare three stoves for winter camping in detail.",
        "Recommend climbing shoes for a beginner with wide feet and explain sizing.",
    ):
        plan = skill.plan([ChatTurn("user", open_question)])
        assert plan.grounded_answer is None, open_question
        assert plan.messages[0].role == "system" and plan.messages[-1].content == open_question
