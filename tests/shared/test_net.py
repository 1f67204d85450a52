"""Listening sockets: a port in use is a `ConfigError` naming the setting, for the library and
for `edgeloop edge serve` (the cloud's ports: tests/cloud_agent/test_faults.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from shared.cli import main
from shared.errors import ConfigError
from shared.net import listen


def test_a_free_port_is_bound_and_a_taken_one_names_the_setting() -> None:
    with listen("127.0.0.1", 0, key="port") as first:
        port = first.getsockname()[1]
        first.listen()
        with pytest.raises(ConfigError, match="address already in use") as info:
            listen("127.0.0.1", port, key="admin_port")
        assert info.value.key == "admin_port" and f"127.0.0.1:{port}" in str(info.value)


def test_edge_serve_on_a_port_in_use_says_so_before_loading_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("EDGELOOP_EDGE__PORT", str(taken.getsockname()[1]))
        assert main(["edge", "serve", "--state-dir", str(tmp_path / "dev")]) == 1
    captured = capsys.readouterr()
    assert "configuration key 'port'" in captured.err and "address already in use" in captured.err
    assert "endpoint" not in captured.out  # no address announced that is not served
