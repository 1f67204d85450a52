"""`edgeloop cloud ...` commands and configuration errors."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import queue
import signal
import subprocess
import sys
import threading
import weakref
from datetime import UTC, datetime, timedelta
from importlib.util import find_spec
from pathlib import Path

import pytest
from pydantic import ValidationError

from cloud_agent.backends import ScriptedBackend
from cloud_agent.backends.pool import BackendPool
from cloud_agent.bundles import MAX_ROTATIONS_TOLD, key_rotations
from cloud_agent.cli import ENV_PREFIX
from cloud_agent.config import CloudConfig
from cloud_agent.conformance import run_conformance
from cloud_agent.service import (
    CloudService,
    build_backend,
    event_loop_factory,
    exposure_warnings,
    settle_heap,
)
from cloud_agent.store import Store
from cloud_agent.store.store import sqlite_url
from examples.handshake import Device
from protocol import (
    ChatMessage,
    Escalate,
    KeyEndorsement,
    ResultReceived,
    Welcomed,
    endorse_key,
    follow_key_rotation,
)
from shared import ConfigError, SigningKey, load_config
from shared.cli import main
from tests.cloud_fixtures import Cloud


def test_enroll_token_devices_and_revoke_work_on_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "cloud")]
    assert main(["cloud", "enroll-token", *data, "--ttl-hours", "1", "--note", "aisle 3"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("elt_")
    assert main(["cloud", "devices", *data]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["cloud", "revoke", *data, "dev_unknown"]) == 1

    async def enroll() -> None:
        store = await Store.open(sqlite_url(tmp_path / "cloud" / "cloud.db"))
        await store.enroll_device(token, "dev_a", "A" * 43)
        await store.close()

    asyncio.run(enroll())
    assert main(["cloud", "revoke", *data, "dev_a"]) == 0
    capsys.readouterr()
    assert main(["cloud", "devices", *data]) == 0
    [device] = json.loads(capsys.readouterr().out)
    assert (device["id"], device["public_key"], device["revoked"]) == ("dev_a", "A" * 43, True)
    datetime.fromisoformat(device["revoked_at"])
    assert device["last_seen_at"] is None
    assert main(["cloud", "forget", *data, "dev_a"]) == 0
    forgotten = json.loads(capsys.readouterr().out)
    assert forgotten["device_id"] == "dev_a" and forgotten["deleted"]["enrollment_tokens"] == 1
    assert main(["cloud", "forget", *data, "dev_unknown"]) == 1
    assert "no device dev_unknown" in capsys.readouterr().err


def test_rotate_key_replaces_server_key_with_one_the_old_key_endorses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "cloud"
    assert main(["cloud", "rotate-key", "--data-dir", str(data_dir)]) == 1, "no cloud there"
    assert not (data_dir / "server.key").exists()
    assert main(["cloud", "enroll-token", "--data-dir", str(data_dir)]) == 0
    first = SigningKey.load_or_create(data_dir / "server.key").verify_key().b64()
    capsys.readouterr()
    for _ in range(2):
        assert main(["cloud", "rotate-key", "--data-dir", str(data_dir)]) == 0
    now = SigningKey.load(data_dir / "server.key").verify_key().b64()
    assert f"the bundle-signing key is now {now}" in capsys.readouterr().out
    assert sorted(p.name for p in data_dir.glob("server.key*")) == ["server.key"]

    async def chain() -> list[KeyEndorsement]:
        store = await Store.open(sqlite_url(data_dir / "cloud.db"))
        try:
            return list(await key_rotations(store))
        finally:
            await store.close()

    rotations = asyncio.run(chain())
    assert len(rotations) == 2 and rotations[-1].public_key == now
    assert follow_key_rotation(first, rotations) == now, "a device pinned to the first follows"


async def test_welcome_tells_the_newest_rotations_only(tmp_path: Path) -> None:
    store = await Store.open(sqlite_url(tmp_path / "cloud.db"))
    try:
        keys = [SigningKey.generate() for _ in range(MAX_ROTATIONS_TOLD + 2)]
        await store.pin_signing_key(keys[0].verify_key().b64())
        for old, new in itertools.pairwise(keys):
            told = endorse_key(old, new.verify_key())
            await store.rotate_signing_key(old.verify_key().b64(), told.public_key, told.signature)
        rotations = await key_rotations(store)
    finally:
        await store.close()
    assert len(rotations) == MAX_ROTATIONS_TOLD, "what one welcome may carry"
    newest = keys[-1].verify_key().b64()
    assert follow_key_rotation(keys[2].verify_key().b64(), rotations) == newest


def test_purge_deletes_expired_tokens_and_needs_a_period(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ["--data-dir", str(tmp_path / "cloud")]
    assert main(["cloud", "purge", *data]) == 2, "no period given or configured"
    assert "--older-than-days" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cloud", "enroll-token", *data, "--ttl-hours", "-1"])
    assert "must be more than 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cloud", "enroll-token", *data, "--note", "x" * 257])
    assert "at most 256 characters" in capsys.readouterr().err

    async def tokens() -> None:
        (tmp_path / "cloud").mkdir()
        store = await Store.open(sqlite_url(tmp_path / "cloud" / "cloud.db"))
        await store.create_enrollment_token(timedelta(hours=-1))  # expired an hour ago
        await store.create_enrollment_token()
        await store.close()

    asyncio.run(tokens())
    monkeypatch.setenv("EDGELOOP_CLOUD__RETENTION_DAYS", "0.01")  # about 15 minutes
    assert main(["cloud", "purge", *data]) == 0
    assert json.loads(capsys.readouterr().out)["enrollment_tokens"] == 1
    assert main(["cloud", "purge", *data, "--older-than-days", "0.01"]) == 0
    assert json.loads(capsys.readouterr().out)["enrollment_tokens"] == 0


def test_routing_sums_the_fleets_reports_from_the_shell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud_agent.store import NewReport, RouteCounts

    data = ["--data-dir", str(tmp_path / "cloud")]

    async def a_report() -> None:
        (tmp_path / "cloud").mkdir()
        store = await Store.open(sqlite_url(tmp_path / "cloud" / "cloud.db"))
        token = await store.create_enrollment_token()
        await store.enroll_device(token, "dev_a", "A" * 43)
        ended = datetime.now(UTC) - timedelta(hours=2)
        await store.add_report(
            NewReport("dev_a", "k1", {"reasons": {"coverage.match": 3}}, ended, ended,
                      RouteCounts(local=3, cloud=1), 2)
        )  # fmt: skip
        await store.close()

    asyncio.run(a_report())
    assert main(["cloud", "routing", *data]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["routes"]["on_device_share"] == 0.75 and summary["devices"] == 1
    assert summary["by_adapter_version"][0]["adapter_version"] == 2
    assert summary["reasons"] == {"coverage.match": 3}
    assert main(["cloud", "routing", *data, "--hours", "1"]) == 0  # it ended two hours ago
    assert json.loads(capsys.readouterr().out)["reports"] == 0
    assert main(["cloud", "routing", *data, "--device", "dev_b"]) == 0
    assert json.loads(capsys.readouterr().out)["reports"] == 0
    for hours in ("0", "many", "100000"):
        with pytest.raises(SystemExit):
            main(["cloud", "routing", *data, "--hours", hours])
        assert "--hours" in capsys.readouterr().err


def test_interactions_lists_what_the_cloud_answered_newest_first_and_pages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud_agent.store import NewInteraction

    data = ["--data-dir", str(tmp_path / "cloud")]

    async def three_escalations() -> None:
        (tmp_path / "cloud").mkdir()
        store = await Store.open(sqlite_url(tmp_path / "cloud" / "cloud.db"))
        token = await store.create_enrollment_token()
        await store.enroll_device(token, "dev_a", "A" * 43)
        for k, status in enumerate(("ok", "error", "ok")):
            await store.record_interaction(
                NewInteraction(
                    "dev_a", f"req_{k}", [{"role": "user", "content": f"question {k}"}], [],
                    status, answer=f"answer {k}" if status == "ok" else None,
                    route_reasons=["intent.unknown"], fact_ids=["hotline"],
                )
            )  # fmt: skip
        await store.close()

    asyncio.run(three_escalations())
    assert main(["cloud", "interactions", *data]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["request_id"] for r in rows] == ["req_2", "req_1", "req_0"]
    assert rows[0]["answer"] == "answer 2" and rows[0]["fact_ids"] == ["hotline"]
    assert rows[0]["messages"] == [{"role": "user", "content": "question 2"}]
    datetime.fromisoformat(rows[0]["created_at"])
    assert (
        main(["cloud", "interactions", *data, "--limit", "1", "--before", str(rows[0]["id"])]) == 0
    )
    assert [r["request_id"] for r in json.loads(capsys.readouterr().out)] == ["req_1"]
    assert main(["cloud", "interactions", *data, "--status", "error"]) == 0
    assert [r["request_id"] for r in json.loads(capsys.readouterr().out)] == ["req_1"]
    assert main(["cloud", "interactions", *data, "--device", "dev_b"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    for bad in (["--status", "failed"], ["--limit", "0"], ["--limit", "1001"]):
        with pytest.raises(SystemExit):
            main(["cloud", "interactions", *data, *bad])
        assert bad[0] in capsys.readouterr().err


def test_commands_on_what_the_cloud_stored_refuse_a_directory_without_its_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A mistyped --data-dir answered "[]" and left an empty database (and a signing key) there.
    typo = tmp_path / "clod"
    for command in (["cloud", "devices"], ["cloud", "interactions"], ["cloud", "routing"],
                    ["cloud", "rollouts"], ["cloud", "rollback", "1"], ["cloud", "revoke", "dev_a"],
                    ["cloud", "jobs", "list"], ["distill", "--steps", "2"]):  # fmt: skip
        assert main([*command, "--data-dir", str(typo)]) == 1, command
        err = capsys.readouterr().err
        assert "'data_dir'" in err and f"no cloud database at {typo}" in err, command
        assert not typo.exists(), command
    # Adding to the store before the cloud first runs makes it.
    assert main(["cloud", "enroll-token", "--data-dir", str(typo)]) == 0
    assert (typo / "cloud.db").exists()
    assert main(["cloud", "devices", "--data-dir", str(typo)]) == 0


def test_a_bad_environment_value_names_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("EDGELOOP_CLOUD__PORT", "not-a-port")
    assert main(["cloud", "devices", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "'port'" in err and "EDGELOOP_CLOUD__PORT" in err


def test_a_bad_option_names_the_key_and_the_option(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["cloud", "serve", "--data-dir", str(tmp_path), "--port", "99999"]) == 1
    err = capsys.readouterr().err
    assert "'port' (from --port)" in err and "Traceback" not in err
    assert main(["edge", "serve", "--state-dir", str(tmp_path), "--port", "-1"]) == 1
    assert "'port' (from --port)" in capsys.readouterr().err


def test_serving_beyond_the_loopback_in_clear_is_warned_about(tmp_path: Path) -> None:
    def warnings(**settings: object) -> list[str]:
        return exposure_warnings(CloudConfig.model_validate(settings))

    assert warnings() == [], "the defaults serve this machine only"
    [devices] = warnings(host="0.0.0.0")
    assert "devices' requests reach 0.0.0.0 unencrypted" in devices and "tls_cert" in devices
    [admin] = warnings(admin_host="10.0.0.7")
    assert "admin API's token reaches 10.0.0.7 unencrypted" in admin
    both = warnings(host="::", admin_host="::", tls_cert="c.pem", tls_key="k.pem")
    assert both == [], "with a certificate both are encrypted"


def test_config_rejects_unknown_keys_and_half_tls(tmp_path: Path) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="'prot'"):
        load_config(CloudConfig, path, env={})
    path.write_text('tls_cert = "cert.pem"\n')
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_config(CloudConfig, path, env={})
    path.write_text('[backend]\nkind = "openai"\n')
    with pytest.raises(ConfigError, match="base_url and model"):
        load_config(CloudConfig, path, env={})
    path.write_text('[backend]\nkind = "openai"\nbase_url = "127.0.0.1:8000"\nmodel = "m"\n')
    with pytest.raises(ConfigError, match="backend.base_url.*http:// or https://"):
        load_config(CloudConfig, path, env={})


def test_an_openai_backend_may_name_several_servers_each_a_member_of_the_pool(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text('[backend]\nkind = "openai"\nmodel = "m"\nbase_url = "http://a:8000/v1"\n')
    assert load_config(CloudConfig, path, env={}).backend.base_url == ("http://a:8000/v1",)
    env = {"EDGELOOP_CLOUD__BACKEND__BASE_URL": "http://a:8000/v1, http://b:8000"}
    config = load_config(CloudConfig, path, env=env, prefix=ENV_PREFIX)
    pool = build_backend(
        config.model_copy(update={"backend": config.backend.model_copy(update={"replicas": 2})})
    )
    assert isinstance(pool, BackendPool)
    assert (
        sorted(m.backend.name for m in pool.members)
        == ["openai:m@a:8000"] * 2 + ["openai:m@b:8000"] * 2
    )
    path.write_text('[backend]\nkind = "openai"\nmodel = "m"\nbase_url = ["http://a", "b:1"]\n')
    with pytest.raises(ConfigError, match="backend.base_url.*not 'b:1'"):
        load_config(CloudConfig, path, env={})


def test_database_urls_name_a_store_the_cloud_can_use() -> None:
    def url(value: str) -> str | None:
        return CloudConfig(database_url=value).database_url

    assert (
        url("postgresql://u:p%40ss@db:5432/edgeloop")
        == "postgresql+asyncpg://u:p%40ss@db:5432/edgeloop"
    )
    assert url("postgres://db/edgeloop") == "postgresql+asyncpg://db/edgeloop"
    assert (
        url("sqlite:////var/lib/edgeloop/cloud.db")
        == "sqlite+aiosqlite:////var/lib/edgeloop/cloud.db"
    )
    assert url("postgresql+asyncpg://db/x?ssl=require") == "postgresql+asyncpg://db/x?ssl=require"
    for bad, problem in (("mysql://db/x", "'mysql' is not supported"),
                         ("postgresql+psycopg2://db/x", "is not supported"),
                         ("cloud.db", "not a database URL")):  # fmt: skip
        with pytest.raises(ValidationError, match=problem):
            url(bad)


def test_defaults_run_alone_on_sqlite_under_the_data_dir(tmp_path: Path) -> None:
    config = CloudConfig(data_dir=tmp_path)
    assert (
        config.resolved_database_url() == f"sqlite+aiosqlite:///{tmp_path.resolve() / 'cloud.db'}"
    )
    assert config.backend.kind == "llama_cpp" and config.backend.model_path is None


def test_rollouts_rollback_and_distill_from_the_shell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "cloud")]
    assert main(["cloud", "enroll-token", *data]) == 0  # the store exists from here on
    capsys.readouterr()
    assert main(["cloud", "rollouts", *data]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["cloud", "rollback", *data, "7"]) == 1
    assert "no adapter version 7" in capsys.readouterr().err
    # An empty store: the cycle declines to train, says why, and exits non-zero.
    assert main(["distill", *data, "--steps", "2"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["published"] is False and "fewer than" in out["reason"]


class Served:
    """`edgeloop cloud serve` in a child process, its output read as it comes."""

    def __init__(self, data_dir: Path, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "cloud", "serve", "--data-dir", str(data_dir),
             "--port", "0", "--admin-port", "0", *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._errors: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None and self.process.stderr is not None
        stderr = self.process.stderr
        self._reader = threading.Thread(target=lambda: [self._errors.put(x) for x in stderr])
        self._reader.start()
        # What it prints once it serves: the URL, the admin API, the event loop.
        self.started = [self.process.stdout.readline() for _ in range(3)]
        assert "edgeloop cloud agent: ws://" in self.started[0], self.started
        self.url = self.started[0].split()[-1]

    def stderr_line(self, containing: str) -> str:
        while True:
            line = self._errors.get(timeout=60)
            if containing in line:
                return line

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            assert stream is not None
            stream.close()


@pytest.mark.slow
def test_serve_reads_the_knowledge_file_again_on_sighup(tmp_path: Path, kb_path: Path) -> None:
    kb = tmp_path / "kb.md"
    kb.write_text(kb_path.read_text(encoding="utf-8"), encoding="utf-8")
    server = Served(tmp_path / "c", "--knowledge", str(kb))
    try:
        kb.write_text(kb.read_text() + "- [gift-wrap] Gift wrapping costs $4 per item.\n")
        server.process.send_signal(signal.SIGHUP)
        reloaded = json.loads(server.stderr_line("knowledge reloaded: ").split(": ", 1)[1])
        assert reloaded["added"] == ["gift-wrap"] and reloaded["facts"] == 21
        kb.write_text("no facts here\n")
        server.process.send_signal(signal.SIGHUP)
        assert "holds no facts" in server.stderr_line("knowledge not reloaded")
        assert server.stop() == 0
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.skipif(find_spec("uvloop") is None, reason="uvloop is not installed (Windows)")
def test_serve_runs_on_uvloop_and_passes_the_conformance_kit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = Served(tmp_path / "c")
    try:
        assert server.started[2].strip() == "event loop: uvloop"
        assert main(["cloud", "enroll-token", "--data-dir", str(tmp_path / "c")]) == 0
        token = capsys.readouterr().out.strip()
        report = asyncio.run(run_conformance(server.url, token, timeout=10))
        assert report.passed, report.table()
        assert server.stop() == 0
    finally:
        server.close()


def test_serve_runs_on_the_event_loop_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert event_loop_factory("asyncio") is None
    if find_spec("uvloop") is not None:
        import uvloop

        assert event_loop_factory("auto") is uvloop.new_event_loop
        assert event_loop_factory("uvloop") is uvloop.new_event_loop
    # Where uvloop cannot be imported, "auto" falls back and "uvloop" is a configuration error.
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert event_loop_factory("auto") is None
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        event_loop_factory("uvloop")
    with pytest.raises(ConfigError, match="event_loop"):
        load_config(CloudConfig, None, env={}, overrides=[("event_loop", "tokio", "--loop")])


def test_settle_heap_collects_garbage_cycles_then_freezes_what_is_alive() -> None:
    class Node:
        def __init__(self) -> None:
            self.other: object = self  # a cycle: only the collector can free it

    garbage, alive = Node(), Node()
    gone = weakref.ref(garbage)
    del garbage
    frozen = gc.get_freeze_count()
    try:
        settle_heap()
        assert gone() is None, "an unreachable cycle was collected, not frozen"
        assert gc.get_freeze_count() > frozen
        assert not any(o is alive for o in gc.get_objects(generation=2)), "frozen, out of sight"
    finally:
        gc.unfreeze()


@pytest.mark.slow
async def test_a_backup_taken_while_the_cloud_serves_is_a_data_directory_to_serve_from(
    cloud: Cloud, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device, creds = await cloud.enroll()
    await device.send(
        Escalate(
            request_id="req_1", messages=[ChatMessage(role="user", content="Tents for snow?")],
            deadline_ms=5000, max_tokens=32,
        )
    )  # fmt: skip
    assert isinstance(await device.next_event(ResultReceived), ResultReceived)
    await cloud.service.server.recorder.flush()
    data = ["--data-dir", str(cloud.service.config.data_dir)]
    backup = tmp_path / "backup"
    # Taken while the cloud serves, its device still connected.
    assert await asyncio.to_thread(main, ["cloud", "backup", *data, str(backup)]) == 0
    listed = capsys.readouterr().out.split()
    assert {Path(p).name for p in listed} == {"cloud.db", "server.key", "admin.token"}
    assert (backup / "server.key").stat().st_mode & 0o777 == 0o600
    await device.close()

    config = CloudConfig.model_validate({"data_dir": backup, "port": 0, "admin_port": 0})
    restored = await CloudService.create(config, backend=ScriptedBackend("From the backup."))
    await restored.start()
    try:
        again = await Device.connect(f"ws://127.0.0.1:{restored.port}/v1", creds)
        assert isinstance(await again.next_event(Welcomed), Welcomed), "its key is there"
        await again.close()
        assert restored.signing_key.verify_key() == cloud.service.signing_key.verify_key()
        (row,) = await restored.store.list_interactions()
        assert row.request_id == "req_1"
    finally:
        await restored.stop()
    # Never over an earlier backup.
    assert await asyncio.to_thread(main, ["cloud", "backup", *data, str(backup)]) == 1
    assert "not an empty directory" in capsys.readouterr().err


def test_a_backup_of_a_cloud_on_postgresql_copies_its_files_and_leaves_the_database_to_pg_dump(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "cloud"
    url = "postgresql+asyncpg://edgeloop@db.invalid/edgeloop"  # never connected to
    args = ["cloud", "backup", "--data-dir", str(data), "--database-url", url]
    assert main([*args, str(tmp_path / "first")]) == 1
    assert "no server.key" in capsys.readouterr().err, "not the cloud's data directory"
    SigningKey.generate().save(data / "server.key")
    assert main([*args, str(tmp_path / "second")]) == 0
    out, err = capsys.readouterr()
    assert [Path(p).name for p in out.split()] == ["server.key"] and "pg_dump" in err
