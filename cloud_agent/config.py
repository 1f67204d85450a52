"""Configuration of `edgeloop cloud serve`: a TOML file and ``EDGELOOP_*`` variables.

Every value has an embedded default, so the service runs alone: SQLite under the data
directory, the packaged SmolLM2 model as the LLM, no knowledge file unless one is given.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from shared.errors import ConfigError
from shared.pii import PhoneRegions

__all__ = [
    "EVENT_LOOPS",
    "PHONE_REGIONS",
    "BackendConfig",
    "CloudConfig",
    "EventLoopChoice",
    "LimitsConfig",
    "RolloutConfig",
]

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]
EVENT_LOOPS: tuple[EventLoopChoice, ...] = get_args(EventLoopChoice)
"""The choices of `CloudConfig.event_loop`, for command lines."""
PHONE_REGIONS = ("US", "GB", "DE", "FR")
"""Where the cloud's detector reads phone numbers written without a country code, by default."""
DATABASE_FILE = "cloud.db"
"""The embedded SQLite database's file name in `CloudConfig.data_dir`."""

_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}
"""Database URL schemes the store takes, and the async driver each means."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class BackendConfig(_Section):
    kind: Literal["llama_cpp", "openai"] = "llama_cpp"
    """`llama_cpp` runs a GGUF model in-process; `openai` calls an OpenAI-compatible server."""
    model_path: Path | None = None
    """GGUF file for `llama_cpp`; default: the packaged SmolLM2-135M-Instruct Q4_1."""
    n_ctx: int = Field(2048, ge=256, le=131072)
    """Context length for `llama_cpp`."""
    threads: int | None = Field(None, ge=1, le=512)
    """CPU threads for `llama_cpp`; default: llama.cpp's choice."""
    stop_repetition: bool = True
    """For `llama_cpp`: end an answer once a sentence of it comes round for the third time (a
    short one for the eighth; small models decoded greedily loop until the token limit); false
    decodes to the limit."""
    base_url: tuple[str, ...] | None = None
    """Server URL for `openai`, as OpenAI's clients take it (http://127.0.0.1:8000/v1; without
    the /v1 means the same), or a list of several servers of the same model, each a member of
    the pool (comma-separated in the environment)."""
    model: str | None = None
    """Model name for `openai`."""
    api_key: str | None = None
    """API key for `openai` (also read from EDGELOOP_CLOUD__BACKEND__API_KEY)."""
    timeout_s: float = Field(60.0, gt=0)
    """Per-call timeout for `openai`."""
    replicas: int = Field(1, ge=1, le=64)
    """How many instances of this backend the pool holds (for `openai`, of each server)."""

    @field_validator("base_url", mode="before")
    @classmethod
    def _http_urls(cls, urls: object) -> tuple[str, ...] | None:
        if urls is None:
            return None
        if isinstance(urls, str):
            urls = [url for url in re.split(r"[\s,]+", urls) if url]
        if not isinstance(urls, list | tuple) or not urls:
            raise ValueError("expected a URL or a list of URLs")
        for url in urls:
            parts = urlsplit(url) if isinstance(url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"expected an http:// or https:// URL with a host, not {url!r}")
        return tuple(urls)

    @model_validator(mode="after")
    def _openai_needs_url_and_model(self) -> BackendConfig:
        if self.kind == "openai" and (not self.base_url or not self.model):
            raise ValueError("backend kind 'openai' needs base_url and model")
        return self


class LimitsConfig(_Section):
    max_message_bytes: int = Field(1 << 20, ge=4096, le=64 << 20)
    """Largest WebSocket frame accepted or sent."""
    max_in_flight: int = Field(8, ge=1, le=1024)
    """Requests a device may have open at once."""
    max_requests_per_minute: int = Field(600, ge=1)
    """Request rate per device above which requests are refused as `rate_limited`."""
    heartbeat_s: int = Field(20, ge=1, le=3600)
    """WebSocket ping interval."""
    max_queue: int = Field(16, ge=1, le=1024)
    """Incoming frames buffered per connection before the server stops reading it."""
    auth_timeout_s: float = Field(10.0, gt=0)
    """A connection not authenticated within this time is closed (4002)."""
    max_tokens: int = Field(4096, ge=1, le=32768)
    """The most tokens the cloud answers one escalation with: a request asking for more (the
    protocol allows 32,768) is answered up to this, its `finish_reason` `length` when cut
    there, so no device or agent runs up the backend's bill with one request."""


class RolloutConfig(_Section):
    canary_share: float = Field(0.1, gt=0.0, le=1.0)
    """Share of enrolled devices offered a new bundle first (at least one device)."""
    max_canary_failures: int = Field(0, ge=0)
    """Canary devices that may reject or roll back a bundle before its rollout halts."""
    min_feedback: int = Field(10, ge=1)
    """Ratings of a new adapter's answers needed before negative feedback can halt it."""
    max_negative_share: float = Field(0.3, gt=0.0, le=1.0)
    """Share of negative ratings on a new adapter's answers above which its rollout halts."""
    poll_s: float = Field(10.0, gt=0)
    """How often replicas re-read rollouts (PostgreSQL also notifies them at once)."""


class AutoDistillConfig(_Section):
    after_examples: int | None = Field(None, ge=1)
    """Submit a distill job by itself once this many answers that could teach the next adapter
    (facts quoted, answers rated up or corrected) have come in since the last distill job, and
    none is waiting or running. None (the default): only when asked (`edgeloop distill`, a
    distill job). Needs the distill extra."""
    check_s: float = Field(600.0, gt=0)
    """How often that count is taken."""
    params: dict[str, Any] = {}
    """The jobs' parameters, as a distill job takes them (steps, min_gain,
    min_gain_over_incumbent, labels, ...)."""

    @model_validator(mode="after")
    def _runnable(self) -> AutoDistillConfig:
        # Checked at start rather than at the first cycle, perhaps days later.
        if self.after_examples is None and not self.params:
            return self  # off: nothing to check (and nothing of the jobs' code to import)
        from cloud_agent.jobs import JobSpecError, job_items_from_rows

        try:
            job_items_from_rows("distill", [self.params])
        except JobSpecError as exc:
            raise ValueError(str(exc)) from None
        if self.after_examples is not None and not all(
            importlib.util.find_spec(name) for name in ("torch", "peft", "transformers")
        ):
            raise ValueError("distilling needs the distill extra (pip install 'edgeloop[distill]')")
        return self


class CloudConfig(_Section):
    server_id: str = "edgeloop-cloud"
    """Id of this service in proofs and logs; replicas of one cluster share it."""
    host: str = "127.0.0.1"
    """Address the WebSocket endpoint binds to."""
    port: int = Field(8765, ge=0, le=65535)
    """WebSocket port (0: any free port)."""
    admin_host: str = "127.0.0.1"
    """Address the admin HTTP API binds to."""
    admin_port: int = Field(8766, ge=0, le=65535)
    """Admin HTTP port (0: any free port)."""
    admin_token: str | None = None
    """Bearer token for the admin API; generated and written to the data directory if unset."""
    tls_cert: Path | None = None
    """PEM certificate for wss:// (and https:// for the admin API); with tls_key."""
    tls_key: Path | None = None
    """PEM private key for wss://."""
    data_dir: Path = Path(".edgeloop/cloud")
    """Where the SQLite database, the signing key and the admin token live."""
    database_url: str | None = None
    """SQLAlchemy URL; default: SQLite in data_dir. PostgreSQL: postgresql+asyncpg://... (a
    plain postgresql:// or sqlite:// URL is taken to mean the async driver the store uses)."""
    store_lock_timeout_s: float = Field(15.0, gt=0, le=600)
    """How long a SQLite write waits for a lock before the store reports itself unavailable."""
    revocation_poll_s: float = Field(10.0, gt=0)
    """How often the store is read for devices revoked or erased elsewhere: a revoked
    device's session ends, and an erased device's feedback is unlearned, within this time at
    the latest. With PostgreSQL every replica hears of both at once (the admin API's or the
    CLI's); the poll covers a replica whose listening connection was down, and the CLI on
    SQLite."""
    knowledge: Path | None = None
    """Knowledge file (Markdown bullets `- [id] text`, or JSONL with id and text)."""
    knowledge_poll_s: float = Field(30.0, gt=0)
    """How often the knowledge index reads feedback taken by other replicas (its own is
    learned at once), and looks whether the knowledge file changed."""
    knowledge_watch: bool = True
    """Reload the knowledge file when it changes (seen within `knowledge_poll_s`), as SIGHUP
    would: every replica reading the file picks up a new version by itself."""
    store_name: str = "the store"
    """How the assistant names the business in its prompt."""
    quote_facts: bool = True
    """Answer a store question whose fact retrieval is confident about with that fact's text,
    without calling the LLM: right with any model, and free. False: the LLM phrases every
    answer, with the best facts in its prompt (for a strong backend that restates them well)."""
    knowledge_top_k: int = Field(3, ge=1, le=20)
    """Most facts put into the LLM's prompt (those related enough to the request)."""
    knowledge_context_turns: int = Field(2, ge=0, le=8)
    """Earlier user turns a follow-up is looked up with when the question alone ties to no
    fact ("What about backpacks?" after "What warranty do tents have?"); 0: the question alone.
    Two, so that a follow-up of a follow-up is still looked up with the turn that named its
    topic."""
    knowledge_context_drift: float = Field(0.1, ge=0.0, le=2.0)
    """How far a request may pull that lookup from the fact the earlier turns point to (in
    cosine similarity) before it counts as a new subject, looked up alone; 2 never does."""
    phone_regions: PhoneRegions = PHONE_REGIONS
    """Regions whose national-format phone numbers (no + country code) the cloud's detector
    finds, in every escalation (defence in depth: the device should have replaced them) and in
    every training set (ISO 3166 codes; numbers with a country code are found whatever this
    says). Add the regions of your devices' customers."""
    capacity: int = Field(1, ge=1, le=1024)
    """Backend calls served at once (scheduler slots)."""
    backend: BackendConfig = BackendConfig()
    limits: LimitsConfig = LimitsConfig()
    rollout: RolloutConfig = RolloutConfig()
    auto_distill: AutoDistillConfig = AutoDistillConfig()
    event_loop: EventLoopChoice = "auto"
    """The event loop `edgeloop cloud serve` runs on: `auto` takes uvloop when it is installed
    (it is with the cloud extra, except on Windows), `asyncio` the standard library's."""
    shutdown_grace_s: float = Field(10.0, ge=0)
    """On shutdown, how long in-flight requests may take to finish."""
    retention_days: float | None = Field(None, gt=0)
    """Delete interactions, feedback, device reports, privacy events, ended sessions and
    expired enrollment tokens older than this many days: at start, then every hour. None (the
    default) keeps everything; `edgeloop cloud purge` does it once, e.g. from cron."""

    @field_validator("database_url")
    @classmethod
    def _a_supported_database(cls, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ValueError("not a database URL, e.g. postgresql+asyncpg://user@host/db") from None
        driver = _ASYNC_DRIVERS.get(parsed.drivername, parsed.drivername)
        if driver not in _ASYNC_DRIVERS.values():
            raise ValueError(
                f"database {parsed.drivername!r} is not supported: use PostgreSQL "
                "(postgresql+asyncpg://user@host/db) or SQLite (sqlite+aiosqlite:///path.db)"
            )
        return parsed.set(drivername=driver).render_as_string(hide_password=False)

    @model_validator(mode="after")
    def _tls_pair(self) -> CloudConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @property
    def sqlite_path(self) -> Path | None:
        """The embedded database's file, unless `database_url` names another database."""
        return None if self.database_url else self.data_dir / DATABASE_FILE

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / DATABASE_FILE).resolve()}"

    def existing_database_url(self) -> str:
        """`resolved_database_url`, for a command on what the cloud has stored: an embedded
        database that is not there is an error (a mistyped `data_dir`), not a new empty one
        that answers every question with nothing."""
        path = self.sqlite_path
        if path is not None and not path.exists():
            raise ConfigError(
                "data_dir",
                f"no cloud database at {path}; `edgeloop cloud serve` creates it there "
                "(or give the cloud's --data-dir or --database-url)",
            )
        return self.resolved_database_url()
