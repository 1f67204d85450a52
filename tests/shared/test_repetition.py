"""`RepetitionGuard`: where a looping answer is cut, whatever the pieces it arrives in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.llama import RepetitionGuard

LOOP = "1. Check the bike before you leave.\n2. Check the bike before you leave.\n3. Check the"


def cut(text: str, pieces: list[int] | None = None, **options: int) -> int | None:
    """Feed `text` split at `pieces` offsets; where in `text` the guard cuts, or None."""
    guard = RepetitionGuard(**options)
    bounds = [0, *(pieces or []), len(text)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        keep = guard.feed(text[start:end])
        if keep is not None:
            return start + keep
    return None


def test_the_third_copy_of_a_sentence_closes_the_loop() -> None:
    text = "Check the bike before you leave. " * 5
    end = cut(text)
    assert end is not None and text[:end].count("Check the bike") == 3
    assert text[:end].endswith("leave.")


def test_two_copies_are_allowed_and_the_count_is_configurable() -> None:
    twice = "Pack water for the trail. Pack water for the trail. Enjoy the hike."
    assert cut(twice) is None
    end = cut(twice, times=2)
    assert end is not None and twice[:end] == "Pack water for the trail. Pack water for the trail."


def test_case_whitespace_and_line_breaks_do_not_hide_a_loop() -> None:
    text = "Dream of a desert trek.\n\ndream  of a DESERT trek.\n\nDream of a desert trek.\n\nmore"
    end = cut(text)
    assert end is not None and text[:end].endswith("trek.") and text[:end].count("trek") == 3


def test_lines_without_punctuation_count_as_sentences() -> None:
    text = "Sincerely,\n[Your Name]\n[Your Position]\n[Your Position]\n[Your Position]\n[Your"
    end = cut(text)
    assert end is not None and text[:end].count("[Your Position]") == 3


def test_short_or_distinct_sentences_never_stop_an_answer() -> None:
    assert cut("Yes. " * 50 + "1. 2. 3. " * 20) is None
    varied = " ".join(f"Step {n}: check item number {n} on the list." for n in range(40))
    assert cut(varied) is None


def test_fewer_than_two_copies_is_refused() -> None:
    with pytest.raises(ValueError):
        RepetitionGuard(times=1)


@given(st.lists(st.integers(0, len(LOOP) * 2), max_size=12))
def test_the_cut_does_not_depend_on_how_the_text_is_split(offsets: list[int]) -> None:
    text = LOOP * 2
    pieces = sorted({o for o in offsets if 0 < o < len(text)})
    assert cut(text, pieces) == cut(text)
