"""A request the packaged SmolLM2 model answers in a loop when decoded greedily, and a way to
see the loop that does not share `RepetitionGuard`'s code."""

from __future__ import annotations

import re
from collections import Counter

from cloud_agent.skills import SYSTEM

LOOPING = [
    {"role": "system", "content": SYSTEM.format(store="Northwind Outfitters")},
    {"role": "user", "content": "Create a checklist for maintaining a bicycle before a long tour."},
]
"""Answered greedily under the cloud's system prompt: "1. Check the bike before you leave.\\n2.
Check the bike before you leave.\\n3. ..." on and on."""


def most_repeated(text: str) -> int:
    """How often the most frequent sentence or line of 12 characters or more occurs."""
    sentences = (" ".join(s.split()).lower() for s in re.split(r"(?<=[.!?])\s+|\n", text))
    counts = Counter(s for s in sentences if len(s) >= 12)
    return max(counts.values(), default=0)
