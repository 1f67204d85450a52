"""Configuration of the `edgeloop edge` commands: a TOML file and ``EDGELOOP_EDGE__*`` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol import check_endpoint
from shared.pii import PhoneRegions

__all__ = ["EdgeConfig"]


class EdgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    cloud_url: str | None = None
    """The cloud agent, e.g. ws://127.0.0.1:8765/v1; none: the one the device enrolled at, and
    for a device not enrolled, no cloud (the device answers everything)."""
    ca_file: Path | None = None
    """PEM file of the certificate authorities a wss:// cloud's certificate is checked against,
    instead of the system's: for a cloud whose certificate a private CA (or the cloud itself)
    signed."""
    state_dir: Path = Path(".edgeloop/edge")
    """Device key, identity, outbox."""
    model_path: Path | None = None
    """GGUF model; default: the packaged SmolLM2-135M-Instruct Q4_1."""
    host: str = "127.0.0.1"
    """Where `edgeloop edge serve` listens (keep it on the device)."""
    port: int = Field(8080, ge=0, le=65535)
    """Port of the local OpenAI-compatible endpoint."""
    api_key: str | None = Field(None, min_length=16)
    """Key the local endpoint requires (``Authorization: Bearer KEY``, as OpenAI's clients send
    it); none: it answers anyone who can reach it, so keep it on 127.0.0.1."""
    deadline_ms: int = Field(8000, ge=100, le=600_000)
    """How long the device waits for the cloud before answering itself."""
    report_every_s: float = Field(300.0, gt=0, le=86_400)
    """How often the device reports to the cloud where it answered its requests (and once more
    when it stops); `edgeloop cloud routing` sums the fleet's reports."""

    phone_regions: PhoneRegions = ("US",)
    """Regions whose national format phone numbers are recognised without a + country code
    (ISO 3166 codes: a UK kiosk says ["GB"]); numbers with one are found whatever this says."""

    @field_validator("cloud_url")
    @classmethod
    def _a_websocket_url(cls, url: str | None) -> str | None:
        return None if url is None else check_endpoint(url)
