"""`RepetitionGuard`: where a looping answer is cut, whatever the pieces it arrives in; and
`Decoding`'s ends (end of turn, stop strings, loops, the token limit) over a scripted model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.llama import Decoding, RepetitionGuard

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


def test_distinct_sentences_never_stop_an_answer_and_short_ones_need_eight_copies() -> None:
    varied = " ".join(f"Step {n}: check item number {n} on the list." for n in range(40))
    assert cut(varied) is None
    lists = "1. Tent. 2. Stove. 3. Mat for it.\n" * 7  # "1." seven times: lists, not a loop
    assert cut(lists) is None
    text = "Great tent. " + "Exquisite. " * 50
    end = cut(text)
    assert end is not None and text[:end].count("Exquisite.") == 8
    signed = "Best regards.\n\nP.S.\n\n" + "P.S.\n\n" * 30  # blank lines are no sentences
    end = cut(signed)
    assert end is not None and signed[:end].count("P.") == 8  # "P." and "S." are sentences
    assert cut("Yes. " * 10, short_times=20) is None


def test_fewer_than_two_copies_is_refused() -> None:
    with pytest.raises(ValueError):
        RepetitionGuard(times=1)
    with pytest.raises(ValueError):
        RepetitionGuard(times=4, short_times=3)


@given(st.lists(st.integers(0, len(LOOP) * 2), max_size=12))
def test_the_cut_does_not_depend_on_how_the_text_is_split(offsets: list[int]) -> None:
    text = LOOP * 2
    pieces = sorted({o for o in offsets if 0 < o < len(text)})
    assert cut(text, pieces) == cut(text)


class ScriptedLlama:
    """Test double for the part of `llama_cpp.Llama` that `Decoding` uses: token i of the
    script is the bytes ``script[i]``; token 0 is the end of turn."""

    def __init__(self, *pieces: bytes) -> None:
        self.vocab = [b"<eot>", *pieces]
        self.prompts: list[list[int]] = []

    def token_eos(self) -> int:
        return 0

    def generate(self, prompt: list[int], **sampling: object) -> Iterator[int]:
        self.prompts.append(prompt)
        yield from range(1, len(self.vocab))
        yield 0

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return b"".join(self.vocab[t] for t in tokens)


def decode(llm: ScriptedLlama, **options: Any) -> tuple[Decoding, list[tuple[int | None, str]]]:
    options.setdefault("stops", [])
    options.setdefault("max_tokens", 100)
    decoding = Decoding(llm, [7, 8], **options)  # type: ignore[arg-type]
    items = list(decoding)
    assert "".join(piece for _, piece in items) == decoding.text, "pieces must add up"
    return decoding, items


def test_decoding_runs_to_the_end_of_turn_and_counts_every_token() -> None:
    llm = ScriptedLlama(b"Hello", b" there", b".")
    decoding, items = decode(llm)
    assert items == [(1, "Hello"), (2, " there"), (3, ".")]
    assert (decoding.text, decoding.count, decoding.finish) == ("Hello there.", 3, "stop")
    assert llm.prompts == [[7, 8]]


def test_a_stop_string_split_over_tokens_is_cut_from_the_text() -> None:
    llm = ScriptedLlama(b"Yes", b" <|im", b"_end|>", b" more")
    decoding, items = decode(llm, stops=["<|im_end|>"])
    assert decoding.text == "Yes " and decoding.finish == "stop" and decoding.count == 3
    assert items == [(1, "Yes"), (2, " "), (3, "")]  # "<|im" waited to see what followed


def test_text_that_only_looked_like_a_stop_string_is_sent_on() -> None:
    decoding, items = decode(ScriptedLlama(b"a <", b"|x", b"!"), stops=["<|im_end|>"])
    assert decoding.text == "a <|x!" and items == [(1, "a "), (2, "<|x"), (3, "!")]
    held, items = decode(ScriptedLlama(b"a <|i"), stops=["<|im_end|>"])
    assert held.text == "a <|i" and items == [(1, "a "), (None, "<|i")]


def test_the_token_limit_ends_with_length() -> None:
    decoding, _ = decode(ScriptedLlama(b"a", b"b", b"c", b"d"), max_tokens=2)
    assert (decoding.text, decoding.count, decoding.finish) == ("ab", 2, "length")


def test_bytes_of_a_character_split_over_tokens_are_joined() -> None:
    snowman = "\u2603".encode()
    decoding, items = decode(ScriptedLlama(snowman[:1], snowman[1:], b"!"))
    assert decoding.text == "\u2603!" and items[0] == (1, "")


def test_a_loop_is_cut_after_the_sentence_that_closed_it() -> None:
    loop = [b"Check the bike", b" before you leave.", b"\n"] * 4
    llm = ScriptedLlama(*loop)
    decoding, _ = decode(llm, repetition=RepetitionGuard())
    assert decoding.finish == "stop" and decoding.count == 8
    assert decoding.text.count("Check the bike before you leave.") == 3
    assert decoding.text.endswith("leave.")
    whole, _ = decode(ScriptedLlama(*loop))
    assert whole.text.startswith(decoding.text) and whole.count == 12
