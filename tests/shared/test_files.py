"""Input files the commands read: a missing or malformed one is a one-line error naming the
file and line, from the reader and from every command that takes one."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.cli import main
from shared.errors import InputFileError
from shared.files import read_json, read_jsonl


def test_rows_are_read_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text('{"text": "hi", "class": "local_simple"}\n\n{"text": "bye"}\n')
    assert read_jsonl(path) == [{"text": "hi", "class": "local_simple"}, {"text": "bye"}]
    with pytest.raises(InputFileError, match=r"w\.jsonl:3: no 'class'"):
        read_jsonl(path, required=("text", "class"))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"text": "ok"}\nnot json\n', r":2: not valid JSON"),
        ('{"text": "ok"}\n["a list"]\n', r":2: expected a JSON object"),
        (b"\xff\xfe{", r"cannot read it"),
    ],
)
def test_malformed_lines_name_the_file_and_line(
    tmp_path: Path, content: str | bytes, problem: str
) -> None:
    path = tmp_path / "items.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(InputFileError, match=problem):
        read_jsonl(path)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")
    with pytest.raises(InputFileError, match="not valid JSON"):
        (tmp_path / "i.json").write_text("{")
        read_json(tmp_path / "i.json")


def test_commands_report_a_bad_input_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "class": "local_simple"}\nnot json\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello", "class": "local_simple"}\n')
    absent = str(tmp_path / "absent.json")
    data = ["--data-dir", str(tmp_path / "cloud")]
    state = ["--state-dir", str(tmp_path / "dev")]
    commands = [
        ["cloud", "jobs", "submit", *data, "--kind", "answer", "--file", str(bad)],
        ["cloud", "jobs", "submit", *data, "--kind", "answer", "--file", absent],
        ["edge", "calibrate", *state, "--workload", str(bad), "--target-local-share", "0.5"],
        ["edge", "calibrate", *state, "--workload", str(good), "--target-local-share", "0.5",
         "--intents", absent],
        ["distill", *data, "--labels", absent],
        ["edge", "calibrate", *state, "--workload", str(empty), "--target-local-share", "0.5"],
        ["demo", "--workload", str(bad), "--dir", str(tmp_path / "demo")],
    ]  # fmt: skip
    for argv in commands:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("edgeloop: error: ") and "Traceback" not in err, err
        assert any(
            problem in err
            for problem in ("bad.jsonl:2: not valid JSON", "absent.json: no such file",
                            "empty.jsonl: no requests")
        ), err  # fmt: skip


def test_a_share_outside_zero_to_one_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"text": "hello"}\n')
    with pytest.raises(SystemExit) as info:
        main(["edge", "calibrate", "--state-dir", str(tmp_path / "dev"), "--workload",
              str(workload), "--target-local-share", "1.5"])  # fmt: skip
    assert info.value.code == 2 and "1.5 is not a share from 0 to 1" in capsys.readouterr().err
