"""Stop strings over an answer that arrives in pieces: the text shown is the answer cut before
the first stop string, however it was split, and nothing shown is ever taken back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.stops import StopFilter, first_stop, held_back


def feed(text: str, offsets: list[int], stops: list[str]) -> tuple[list[str], StopFilter]:
    """`text` split at `offsets` through a filter: the pieces shown (the flush last)."""
    bounds = [0, *sorted({o for o in offsets if 0 < o < len(text)}), len(text)]
    shown = StopFilter(stops)
    pieces = [shown.feed(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return [*pieces, shown.flush()], shown


def test_the_answer_ends_before_the_first_stop_string() -> None:
    assert first_stop("Open at 9.\nClosed Sundays.", ["\n", "Sun"]) == 10
    assert first_stop("Open at 9.", ["\n"]) is None
    # The first complete as the text is read: "a" is whole before ".aa" is.
    assert first_stop(".aa", ["a", ".aa"]) == 1 and first_stop("x.aa", [".a", ".aa"]) == 1
    pieces, shown = feed("Open at 9.\nClosed Sundays.", [3, 10, 11, 20], ["Sun", "\n"])
    assert "".join(pieces) == shown.text == "Open at 9." and shown.stopped
    assert shown.feed("more") == "" and shown.cut("Open at 9.\nClosed") == "Open at 9."


def test_a_possible_start_of_a_stop_string_waits_for_the_next_piece() -> None:
    shown = StopFilter(["END"])
    assert held_back("ready E", ["END"]) == 1 and held_back("ready EN", ["END"]) == 2
    assert shown.feed("ready E") == "ready " and shown.feed("N") == ""
    assert shown.feed("ough") == "ENough", "not the stop string after all: shown whole"
    assert shown.feed(" then EN") == " then " and shown.feed("D and more") == ""
    assert shown.text == "ready ENough then " and shown.stopped


def test_without_stop_strings_everything_passes_at_once() -> None:
    shown = StopFilter(["", ""])
    assert shown.feed("a <b") == "a <b" and shown.flush() == "" and not shown.stopped


@given(
    st.text(alphabet="ab. \n", max_size=40),
    st.lists(st.integers(0, 40), max_size=10),
    st.lists(st.text(alphabet="ab. \n", min_size=1, max_size=4), min_size=1, max_size=4),
)
def test_what_is_shown_does_not_depend_on_how_the_answer_is_split(
    text: str, offsets: list[int], stops: list[str]
) -> None:
    pieces, shown = feed(text, offsets, stops)
    whole = shown.cut(text)
    assert "".join(pieces) == shown.text == whole
    assert shown.stopped == (first_stop(text, stops) is not None)
    # No prefix shown on the way contains a stop string: nothing is shown and then withdrawn.
    so_far = ""
    for piece in pieces:
        so_far += piece
        assert first_stop(so_far, stops) is None
