"""The durable outbox: survives kill -9, resends until acked, bounded with a drop policy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_agent.outbox import Outbox, OutboxError


def test_entries_wait_until_acked_and_a_second_put_of_a_key_is_a_no_op(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    box.put("feedback", "idk_1", {"request_id": "r1", "rating": "positive"})
    box.put("feedback", "idk_1", {"request_id": "r1", "rating": "positive"})
    box.put("report", "idk_2", {"routes": {"local": 3}})
    first = box.pending()
    assert [(e.idempotency_key, e.attempts) for e in first] == [("idk_1", 1), ("idk_2", 1)]
    assert [e.attempts for e in box.pending()] == [2, 2], "a resend counts as an attempt"
    assert box.ack("idk_1") is True and box.ack("idk_1") is False
    assert [e.idempotency_key for e in box.pending()] == ["idk_2"]
    box.close()


def test_past_the_cap_reports_are_dropped_before_feedback_and_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", capacity=3)
    box.put("feedback", "f1", {})
    box.put("report", "r1", {})
    box.put("feedback", "f2", {})
    box.put("feedback", "f3", {})  # over the cap: the report goes
    assert [e.idempotency_key for e in box.pending()] == ["f1", "f2", "f3"]
    box.put("feedback", "f4", {})  # only feedback left: the oldest goes
    assert [e.idempotency_key for e in box.pending()] == ["f2", "f3", "f4"]
    assert box.dropped() == {"report": 1, "feedback": 1} and len(box) == 3


def test_an_entry_survives_kill_9_right_after_put_returns(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    child = textwrap.dedent(
        f"""
        import sys
        from edge_agent.outbox import Outbox
        box = Outbox({str(path)!r})
        for i in range(50):
            box.put("feedback", f"idk_{{i}}", {{"request_id": f"r{{i}}", "rating": "negative"}})
        print("stored", flush=True)
        sys.stdin.read()  # wait to be killed
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "stored"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.stdout.close()
        proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL
    box = Outbox(path)
    assert len(box) == 50
    assert box.pending(limit=100)[-1].payload == {"request_id": "r49", "rating": "negative"}


def test_an_unusable_path_is_an_outbox_error(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutboxError):
        Outbox(tmp_path / "a_file" / "outbox.db")
