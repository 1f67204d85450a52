"""Scoring answers against expected facts, as the labelled workloads state them.

An expectation is a list of groups; every group must appear in the answer, and any one of a
group's alternatives is enough (case-insensitive): ``[["$75", "75 dollars"], ["$6.95"]]``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["contains_expected"]


def contains_expected(answer: str, expect: Sequence[Sequence[str]]) -> bool:
    text = answer.lower()
    return all(any(alt.lower() in text for alt in group) for group in expect)
