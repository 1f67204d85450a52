"""The published schema, AsyncAPI document and SPEC.md agree with the code."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from protocol import ErrorCode, decode, encode
from protocol.examples import EXAMPLES
from protocol.messages import MESSAGE_TYPES
from protocol.schema import SCHEMA_DIR, SPEC_FILE, asyncapi, json_schema, stale
from shared.cli import main

SPEC = SPEC_FILE.read_text(encoding="utf-8")
VALIDATOR = jsonschema.Draft202012Validator(json_schema())


def test_published_files_are_not_stale() -> None:
    assert stale() == [], "run `edgeloop protocol schema` and commit the result"


def test_the_schema_check_command_fails_on_a_stale_copy(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["protocol", "schema", "--check"]) == 0
    (tmp_path / "edgeloop-v1.schema.json").write_text("{}")
    assert main(["protocol", "schema", "--check", "--out", str(tmp_path)]) == 1
    assert "stale" in capsys.readouterr().err


def test_the_committed_schema_is_valid_json_schema_2020_12() -> None:
    schema = json.loads((SCHEMA_DIR / "edgeloop-v1.schema.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("tag", sorted(MESSAGE_TYPES))
def test_the_json_schema_accepts_what_the_code_sends(tag: str) -> None:
    VALIDATOR.validate(json.loads(encode(EXAMPLES[tag])))


@pytest.mark.parametrize("tag", sorted(MESSAGE_TYPES))
def test_the_json_schema_refuses_what_the_code_refuses(tag: str) -> None:
    frame = json.loads(encode(EXAMPLES[tag]))
    frame["unexpected"] = True
    assert not VALIDATOR.is_valid(frame)
    del frame["unexpected"]
    del frame["type"]
    assert not VALIDATOR.is_valid(frame)


def _spec_examples() -> list[dict[str, object]]:
    blocks = re.findall(r"```json\n(.*?)```", SPEC, flags=re.S)
    return [json.loads(block) for block in blocks]


def test_spec_has_a_valid_example_of_every_message() -> None:
    examples = _spec_examples()
    assert {e["type"] for e in examples} == set(MESSAGE_TYPES)
    for example in examples:
        VALIDATOR.validate(example)
        decode(json.dumps(example))


def test_spec_error_table_lists_every_code_with_its_name() -> None:
    for code in ErrorCode:
        assert re.search(rf"^\| {int(code)} \| `{code.wire_name}` \|", SPEC, flags=re.M), code


def test_spec_has_the_sequence_diagrams_a_vendor_needs() -> None:
    for title in ("Enrollment", "Connect", "Escalate with streaming, and cancel",
                  "Feedback with acknowledgement", "Update fetch"):  # fmt: skip
        assert re.search(rf"### {re.escape(title)}\n\n```mermaid\nsequenceDiagram", SPEC), title


def test_asyncapi_lists_every_message_with_a_resolvable_payload() -> None:
    doc = json.loads((SCHEMA_DIR / "edgeloop-v1.asyncapi.json").read_text())
    assert doc == asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    messages = doc["channels"]["session"]["messages"]
    assert set(messages) == set(MESSAGE_TYPES)
    defs = json_schema()["$defs"]
    for message in messages.values():
        file, _, pointer = message["payload"]["$ref"].partition("#")
        assert file == "edgeloop-v1.schema.json"
        assert pointer.rsplit("/", 1)[-1] in defs
    sent = {
        op: {ref["$ref"].rsplit("/", 1)[-1] for ref in doc["operations"][op]["messages"]}
        for op in ("clientSends", "serverSends")
    }
    assert "escalate" in sent["clientSends"] and "escalate" not in sent["serverSends"]
    assert "error" in sent["clientSends"] and "error" in sent["serverSends"]
