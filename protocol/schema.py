"""The published descriptions of the protocol, generated from the models.

`json_schema()` is a JSON Schema (2020-12) of every frame; `asyncapi()` is an AsyncAPI 3.0
document of the WebSocket channel that references it. `write_all` writes both under
`protocol/schema/`; a test fails when the committed files are stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protocol.auth import SUBPROTOCOL, SUPPORTED_VERSIONS
from protocol.errors import ErrorCode, error_info
from protocol.messages import (
    MESSAGE_ADAPTER,
    MESSAGE_TYPES,
)
from protocol.parts import (
    BundleManifest,
)

__all__ = [
    "SCHEMA_DIR",
    "SPEC_FILE",
    "asyncapi",
    "json_schema",
    "render_spec",
    "rendered",
    "spec_sections",
    "stale",
    "write_all",
]

SCHEMA_DIR = Path(__file__).with_name("schema")
SCHEMA_FILE = "edgeloop-v1.schema.json"
ASYNCAPI_FILE = "edgeloop-v1.asyncapi.json"
SCHEMA_ID = "https://edgeloop.dev/schema/edgeloop-v1.schema.json"


def json_schema() -> dict[str, Any]:
    """JSON Schema 2020-12 for one frame of protocol v1 (any message)."""
    body = MESSAGE_ADAPTER.json_schema(ref_template="#/$defs/{model}")
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "edgeloop protocol v1 frame",
        "description": (
            "One JSON text frame of the edgeloop agent protocol. "
            f"WebSocket subprotocol `{SUBPROTOCOL}`; versions {', '.join(SUPPORTED_VERSIONS)}."
        ),
    }
    schema.update(body)
    # The manifest travels as the exact JSON text that was signed; describe what it must hold.
    manifest_schema = BundleManifest.model_json_schema(ref_template="#/$defs/{model}")
    schema["$defs"].update(manifest_schema.pop("$defs", {}))
    schema["$defs"]["BundleManifest"] = manifest_schema
    schema["$defs"]["UpdateOffer"]["properties"]["manifest"].update(
        {
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/$defs/BundleManifest"},
        }
    )
    schema["$defs"]["ErrorCode"] = {
        "description": "Known error codes; `name` is the lower-case name.",
        "oneOf": [
            {"const": int(code), "title": code.wire_name, "description": error_info(code).summary}
            for code in ErrorCode
        ],
    }
    return schema


def asyncapi() -> dict[str, Any]:
    """AsyncAPI 3.0 description of the WebSocket channel."""
    messages: dict[str, Any] = {}
    sent_by_client: list[dict[str, str]] = []
    sent_by_server: list[dict[str, str]] = []
    for tag, cls in MESSAGE_TYPES.items():
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        messages[tag] = {
            "name": tag,
            "title": cls.__name__,
            "summary": doc,
            "contentType": "application/json",
            "payload": {"$ref": f"{SCHEMA_FILE}#/$defs/{cls.__name__}"},
        }
        ref = {"$ref": f"#/channels/session/messages/{tag}"}
        if cls.direction in ("client", "both"):
            sent_by_client.append(ref)
        if cls.direction in ("server", "both"):
            sent_by_server.append(ref)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "edgeloop agent protocol",
            "version": SUPPORTED_VERSIONS[-1],
            "description": (
                "Typed agent protocol between edge devices (or third-party agents) and the "
                "edgeloop cloud agent. One JSON message per text frame; bundle data in binary "
                "frames announced by a `chunk` message. See protocol/SPEC.md."
            ),
        },
        "servers": {
            "cloud": {
                "host": "localhost:8765",
                "protocol": "ws",
                "description": "A cloud agent (`edgeloop cloud serve`); use wss in production.",
            }
        },
        "channels": {
            "session": {
                "address": "/v1",
                "description": "One authenticated session per connection.",
                "messages": messages,
                "bindings": {"ws": {"bindingVersion": "0.1.0"}},
            }
        },
        "operations": {
            "clientSends": {
                "action": "receive",
                "channel": {"$ref": "#/channels/session"},
                "summary": "Frames the server receives from a device.",
                "messages": sent_by_client,
            },
            "serverSends": {
                "action": "send",
                "channel": {"$ref": "#/channels/session"},
                "summary": "Frames the server sends to a device.",
                "messages": sent_by_server,
            },
        },
        "components": {
            "x-websocket-subprotocol": SUBPROTOCOL,
        },
    }


def rendered() -> dict[str, str]:
    """File name to exact file content, as committed."""

    def dump(doc: dict[str, Any]) -> str:
        return json.dumps(doc, indent=2, sort_keys=False, ensure_ascii=False) + "\n"

    return {SCHEMA_FILE: dump(json_schema()), ASYNCAPI_FILE: dump(asyncapi())}


def write_all(directory: Path = SCHEMA_DIR, spec: Path | None = None) -> list[Path]:
    """Write the schema documents into `directory` and refresh SPEC.md's generated sections."""
    spec = SPEC_FILE if spec is None else spec
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    spec.write_text(render_spec(spec.read_text(encoding="utf-8")), encoding="utf-8")
    written.append(spec)
    return written


def stale(directory: Path = SCHEMA_DIR, spec: Path | None = None) -> list[str]:
    """Paths of published files that differ from what the code generates."""
    spec = SPEC_FILE if spec is None else spec
    out = []
    for name, text in rendered().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            out.append(str(path))
    current = spec.read_text(encoding="utf-8")
    if render_spec(current) != current:
        out.append(str(spec))
    return out


# --- SPEC.md: the reference sections are generated, the prose around them is not ---------

SPEC_FILE = Path(__file__).with_name("SPEC.md")
_BEGIN = "<!-- BEGIN GENERATED: {name} (edgeloop protocol schema) -->"
_END = "<!-- END GENERATED: {name} -->"


def _type_of(prop: dict[str, Any]) -> str:
    if "const" in prop:
        return f'`"{prop["const"]}"`'
    if "enum" in prop:
        return " or ".join(f'`"{v}"`' for v in prop["enum"])
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in prop:
        options = [p for p in prop["anyOf"] if p.get("type") != "null"]
        nullable = len(options) < len(prop["anyOf"])
        text = " or ".join(_type_of(p) for p in options)
        return f"{text} (nullable)" if nullable else text
    kind = prop.get("type", "any")
    if kind == "array":
        return f"array of {_type_of(prop.get('items', {}))}"
    if kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        return f"object of {_type_of(prop['additionalProperties'])}"
    if kind == "string" and prop.get("format") == "date-time":
        return "string (RFC 3339)"
    return str(kind)


def _fields_table(schema: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", []))
    lines = ["| field | type | required | meaning |", "|---|---|---|---|"]
    for name, prop in schema.get("properties", {}).items():
        desc = (prop.get("description") or "").replace("|", "\\|").replace("\n", " ")
        if name == "type":
            desc = "Message tag."
        lines.append(
            f"| `{name}` | {_type_of(prop).replace('|', '/')} | "
            f"{'yes' if name in required else 'no'} | {desc} |"
        )
    return lines


def spec_sections() -> dict[str, str]:
    """The generated sections of SPEC.md, by marker name."""
    from protocol.errors import CloseCode
    from protocol.examples import EXAMPLES
    from protocol.messages import encode

    defs = json_schema()["$defs"]
    messages: list[str] = []
    for tag, cls in MESSAGE_TYPES.items():
        doc = " ".join((cls.__doc__ or "").split())
        sender = {"client": "device", "server": "cloud", "both": "either side"}[cls.direction]
        phase = "allowed before authentication" if cls.session_phase else "only after `welcome`"
        messages += [f"### `{tag}`", "", f"{doc} Sent by: {sender}; {phase}.", ""]
        messages += _fields_table(defs[cls.__name__])
        example = json.dumps(json.loads(encode(EXAMPLES[tag])), indent=2, ensure_ascii=False)
        messages += ["", "```json", example, "```", ""]
    parts: list[str] = []
    for name in ("BaseModelRef", "DeviceResources", "Limits", "ChatMessage", "Usage",
                 "RouteCounts", "BundleFile", "BundleManifest"):  # fmt: skip
        doc = " ".join((defs[name].get("description") or "").split())
        parts += [f"### {name}", "", doc, ""] + _fields_table(defs[name]) + [""]
    errors = ["| code | name | retryable | meaning |", "|---|---|---|---|"]
    for code in ErrorCode:
        info = error_info(code)
        errors.append(
            f"| {int(code)} | `{code.wire_name}` | {'yes' if info.retryable else 'no'} | "
            f"{info.summary} |"
        )
    close_meaning = {
        CloseCode.NORMAL: "Normal closure (after `goodbye`).",
        CloseCode.GOING_AWAY: "The server is shutting down or draining.",
        CloseCode.POLICY_VIOLATION: (
            "Authentication failed, a rule was broken before it, or the device was revoked."
        ),
        CloseCode.MESSAGE_TOO_BIG: "A frame exceeded `max_message_bytes`.",
        CloseCode.INTERNAL_ERROR: "The server failed unexpectedly.",
        CloseCode.PROTOCOL_VIOLATION: "Too many protocol violations in one session.",
        CloseCode.UNSUPPORTED_VERSION: "No common protocol version.",
        CloseCode.AUTH_TIMEOUT: "The session was not authenticated in time.",
        CloseCode.SESSION_REPLACED: (
            "The same device opened a newer session; do not reconnect by yourself."
        ),
    }
    closes = ["| code | meaning |", "|---|---|"]
    closes += [f"| {int(c)} | {close_meaning[c]} |" for c in CloseCode]
    return {
        "messages": "\n".join(messages).rstrip() + "\n",
        "parts": "\n".join(parts).rstrip() + "\n",
        "errors": "\n".join(errors) + "\n",
        "closes": "\n".join(closes) + "\n",
    }


def render_spec(text: str) -> str:
    """`text` (SPEC.md) with every generated section replaced by what the code says now."""
    for name, body in spec_sections().items():
        begin, end = _BEGIN.format(name=name), _END.format(name=name)
        head, sep, rest = text.partition(begin)
        if not sep:
            raise ValueError(f"SPEC.md lacks the marker {begin}")
        _, sep, tail = rest.partition(end)
        if not sep:
            raise ValueError(f"SPEC.md lacks the marker {end}")
        text = f"{head}{begin}\n\n{body}\n{end}{tail}"
    return text
