"""`edgeloop edge ...`: enroll a device, chat in the terminal, serve the local OpenAI endpoint,
show the device's state, calibrate the router."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge_agent.config import EdgeConfig
from edge_agent.errors import EdgeAgentError
from shared.config import load_config
from shared.errors import InputFileError
from shared.files import read_json, read_jsonl
from shared.net import is_loopback, listen, tls_client_context

if TYPE_CHECKING:
    from edge_agent.agent import Conversation, EdgeAgent

__all__ = ["register"]

ENV_PREFIX = "EDGELOOP_EDGE__"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "edge", help="the device side: enroll, chat, local endpoint, status"
    )
    sub = parser.add_subparsers(title="edge commands", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help=f"TOML file; {ENV_PREFIX}* variables win")
        p.add_argument(
            "--cloud",
            dest="cloud_url",
            help="cloud URL, e.g. ws://127.0.0.1:8765/v1 (default: the one the device enrolled at)",
        )
        p.add_argument(
            "--ca-file",
            type=Path,
            help="PEM file of the CAs a wss:// cloud's certificate is checked against "
            "(default: the system's)",
        )
        p.add_argument("--state-dir", type=Path, help="device key, identity and outbox")
        p.add_argument("--model", dest="model_path", type=Path, help="GGUF model file")

    enroll = sub.add_parser("enroll", help="enroll this device with a one-time token")
    common(enroll)
    enroll.add_argument("--token", required=True, help="token from `edgeloop cloud enroll-token`")
    enroll.set_defaults(func=_enroll)

    chat = sub.add_parser(
        "chat",
        help="chat in the terminal, showing the route of each answer; /good and /bad rate it",
        description=CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(chat)
    chat.set_defaults(func=_chat)

    serve = sub.add_parser(
        "serve",
        help="serve /v1/chat/completions, /v1/models and /v1/feedback locally",
        description="The OpenAI-compatible endpoint, on 127.0.0.1 unless `host` is set in the "
        "configuration. With api_key (or EDGELOOP_EDGE__API_KEY) every request must carry "
        "'Authorization: Bearer KEY'.",
    )
    common(serve)
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.set_defaults(func=_serve)

    status = sub.add_parser(
        "status",
        help="this device's enrollment and cloud, active adapter and outbox as JSON (reads its "
        "state only; the cloud need not be reachable)",
    )
    common(status)
    status.set_defaults(func=_status)

    calibrate = sub.add_parser(
        "calibrate", help="set the router's threshold from labelled requests to a local share"
    )
    common(calibrate)
    calibrate.add_argument("--workload", type=Path, required=True, help="JSONL with a `text` field")
    calibrate.add_argument(
        "--target-local-share", type=_share, required=True, help="share to keep local, 0 to 1"
    )
    calibrate.set_defaults(func=_calibrate)

    for p in (chat, serve, calibrate):
        p.add_argument(
            "--intents",
            type=Path,
            help="JSON object: intent name -> example list, or -> {examples, reply, privacy}; "
            "answered on the device, with the reply when given (default: greetings, thanks, "
            "goodbyes and questions about the assistant, with replies)",
        )


def _config(args: argparse.Namespace) -> EdgeConfig:
    options = [
        (key, value, option)
        for key, option in (
            ("cloud_url", "--cloud"),
            ("ca_file", "--ca-file"),
            ("state_dir", "--state-dir"),
            ("model_path", "--model"),
            ("port", "--port"),
        )  # fmt: skip
        if (value := getattr(args, key, None)) is not None
    ]
    config = load_config(EdgeConfig, args.config, prefix=ENV_PREFIX, overrides=options)
    if config.cloud_url is None:
        # An enrolled device connects to the cloud it enrolled with unless told otherwise.
        from edge_agent.link import read_identity

        config.cloud_url = read_identity(config.state_dir).cloud_url
    return config


def _link(config: EdgeConfig, token: str | None = None) -> Any:
    from edge_agent.link import CloudLink
    from edge_agent.outbox import Outbox

    if config.cloud_url is None:
        return None
    tls = tls_client_context(config.cloud_url, config.ca_file, key="ca_file")
    return CloudLink(
        config.cloud_url,
        config.state_dir,
        enrollment_token=token,
        outbox=Outbox(config.state_dir / "outbox.db"),
        ssl=tls,
    )


def _status(args: argparse.Namespace) -> int:
    from edge_agent.apply import active_version, bundle_manifest
    from edge_agent.link import read_identity
    from edge_agent.outbox import Outbox

    config = _config(args)
    state = config.state_dir
    identity = read_identity(state)
    adapter: dict[str, Any] | None = None
    if (version := active_version(state)) is not None:
        adapter = {"version": version}
        try:
            manifest = bundle_manifest(state, version)
            adapter |= {"name": manifest.name, "created_at": manifest.created_at.isoformat(),
                        "metrics": manifest.metrics}  # fmt: skip
        except (OSError, ValueError) as exc:
            adapter["problem"] = f"its manifest cannot be read ({type(exc).__name__})"
    outbox: dict[str, Any] = {"waiting": {}, "oldest_waiting_s": None, "dropped": {}}
    if (state / "outbox.db").exists():  # looking does not create one
        box = Outbox(state / "outbox.db")
        try:
            waiting, oldest = box.waiting()
            outbox = {"waiting": waiting, "oldest_waiting_s": oldest and round(oldest, 1),
                      "dropped": box.dropped()}  # fmt: skip
        finally:
            box.close()
    status = {
        "state_dir": str(state),
        "cloud_url": config.cloud_url,
        "enrolled": identity.device_id is not None,
        "device_id": identity.device_id,
        "server_key": identity.server_key,
        "adapter": adapter,
        "outbox": outbox,
    }
    print(json.dumps(status, indent=2))
    return 0


@dataclass(frozen=True, slots=True)
class _Intent:
    """One intent the device answers itself: its example utterances, and the reply it gives
    (None: the local model answers)."""

    name: str
    examples: tuple[str, ...]
    reply: str | None = None
    local_only: bool = False


def _intents(path: Path | None) -> list[_Intent]:
    """The intents of a `--intents` file, or small talk with its replies.

    The file is a JSON object of intent names, each to a list of example utterances or to an
    object with `examples`, and optionally `reply` (the device answers with it) and `privacy`
    ("local_only": such requests never leave the device)."""
    from edge_agent.router import SMALL_TALK, SMALL_TALK_REPLIES

    if path is None:
        return [
            _Intent(name, tuple(ex), SMALL_TALK_REPLIES.get(name))
            for name, ex in SMALL_TALK.items()
        ]
    table = read_json(path)
    if not isinstance(table, dict):
        raise InputFileError(f"{path}: expected an object of intent names")
    out = []
    for name, spec in table.items():
        where = f"{path}: intent {name!r}"
        if isinstance(spec, list):
            spec = {"examples": spec}
        if not isinstance(spec, dict) or set(spec) - {"examples", "reply", "privacy"}:
            raise InputFileError(
                f"{where}: expected a list of examples or an object of examples, reply and privacy"
            )
        examples, reply = spec.get("examples"), spec.get("reply")
        privacy = spec.get("privacy", "normal")
        if (
            not isinstance(examples, list)
            or not examples
            or not all(isinstance(x, str) and x.strip() for x in examples)
        ):
            raise InputFileError(f"{where}: examples must be a non-empty list of texts")
        if reply is not None and not (isinstance(reply, str) and reply.strip()):
            raise InputFileError(f"{where}: reply must be a text")
        if privacy not in ("normal", "local_only"):
            raise InputFileError(f"{where}: privacy is 'normal' or 'local_only', not {privacy!r}")
        out.append(_Intent(name, tuple(examples), reply, privacy == "local_only"))
    return out


def _router(config: EdgeConfig, intents: list[_Intent]) -> Any:
    from edge_agent.privacy import Redactor
    from edge_agent.router import IntentIndex, Router

    index = IntentIndex()
    for intent in intents:
        index.add(intent.name, intent.examples, local_only=intent.local_only)
    router = Router(index, redactor=Redactor(phone_regions=config.phone_regions))
    saved = config.state_dir / "router.json"
    if saved.exists():
        router.threshold = float(json.loads(saved.read_text())["threshold"])
    return router


def _agent(config: EdgeConfig, intents: list[_Intent]) -> Any:
    from edge_agent.agent import EdgeAgent
    from edge_agent.local_model import LocalModel
    from protocol import BaseModelRef

    model = LocalModel(config.model_path)
    link = _link(config)
    if link is not None:
        link.base_model = BaseModelRef(id=model.model_id, sha256=model.sha256)
    agent = EdgeAgent(
        model,
        link=link,
        router=_router(config, []),
        deadline_ms=config.deadline_ms,
        report_every_s=config.report_every_s,
    )
    for intent in intents:
        agent.intent(
            intent.name,
            intent.examples,
            intent.reply,
            privacy="local_only" if intent.local_only else "normal",
        )
    # Signed adapter bundles from the cloud: the committed one is restored now, new ones are
    # verified, hot-swapped and reported as the cloud offers them.
    agent.enable_updates(config.state_dir)
    return agent


def _share(value: str) -> float:
    try:
        share = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"{share:g} is not a share from 0 to 1")
    return share


def _calibrate(args: argparse.Namespace) -> int:
    from edge_agent.router import calibrate

    config = _config(args)
    texts = [row["text"] for row in read_jsonl(args.workload, required=("text",))]
    if not texts:
        raise InputFileError(f"{args.workload}: no requests to calibrate on")
    router = _router(config, _intents(args.intents))
    threshold = calibrate(router, texts, args.target_local_share)
    local = sum(router.decide(t).local for t in texts) / len(texts)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    (config.state_dir / "router.json").write_text(json.dumps({"threshold": threshold}))
    print(f"threshold {threshold:.4f}: {local:.1%} of {len(texts)} requests stay on the device")
    print(f"saved in {config.state_dir / 'router.json'}")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    config = _config(args)
    if config.cloud_url is None:
        print("edgeloop: error: --cloud is required to enroll", file=sys.stderr)
        return 2

    async def run() -> int:
        link = _link(config, args.token)
        if link.enrolled:
            print(f"already enrolled as {link.identity.device_id}")
            return 0
        link.start()
        # Until the cloud takes the device or refuses it, for 15 s; a TLS failure (a
        # certificate not trusted, a server that does not speak TLS) ends it at once: trying
        # again would not change it.
        for _ in range(60):
            up = await link.wait_up(0.25)
            if up or link.refused is not None or isinstance(link.last_error, ssl.SSLError):
                break
        await link.stop()
        if not up or not link.enrolled:
            if link.refused == "invalid_enrollment_token":
                why = "the cloud refused the token (unknown, already used or expired)"
            elif link.refused is not None:
                why = f"the cloud refused this device ({link.refused})"
            elif isinstance(link.last_error, ssl.SSLCertVerificationError):
                why = (
                    f"the certificate of {link.url} is not trusted "
                    f"({link.last_error.verify_message}); --ca-file names the CA that signed it"
                )
            elif link.last_failure is not None:
                why = f"cannot reach the cloud at {link.url} ({link.last_failure})"
            else:
                why = f"no answer from the cloud at {link.url} within 15 s"
            print(f"edgeloop: error: enrollment failed: {why}", file=sys.stderr)
            return 1
        print(f"enrolled as {link.identity.device_id}; identity in {config.state_dir}")
        return 0

    return asyncio.run(run())


CHAT_HELP = """each message is answered with the conversation so far (the last 8 exchanges)
commands:
  /good                  rate the last answer positive
  /bad [correction]      rate it negative, optionally with the right answer
  /new                   start a new conversation
  /help                  this list
Ctrl-D quits; feedback not yet acknowledged stays in the outbox and is sent next time."""


def _chat(args: argparse.Namespace) -> int:
    config = _config(args)
    intents = _intents(args.intents)

    async def run() -> None:
        agent = _agent(config, intents)
        await agent.start()
        if agent.link is not None:
            await agent.link.wait_up(5)
        conversation = agent.conversation()
        last: str | None = None
        """Request id of the last answer: what /good and /bad rate."""
        try:
            while True:
                line = await asyncio.to_thread(sys.stdin.readline)
                if not line:
                    break
                text = line.strip()
                if not text:
                    continue
                if text.startswith("/"):
                    await _chat_command(conversation, text, last)
                    continue
                try:
                    stream = conversation.stream(text)
                    async for piece in stream:
                        print(piece, end="", flush=True)
                except (ValueError, EdgeAgentError) as exc:
                    # Too long for the device's context, say: the chat goes on.
                    print(f"\n  [not answered: {exc}]")
                    continue
                reply = stream.reply
                last = reply.request_id
                where = "cloud" if reply.from_cloud else "device"
                why = f", fallback: {reply.fallback_reason}" if reply.fallback_reason else ""
                print(f"\n  [{where}; {reply.decision.explain()}{why}; {reply.latency_ms:.0f} ms]")
            if kept := await _send_what_waits(agent, 5):
                print(f"  [{kept} message(s) kept in the outbox for next time]")
        finally:
            await agent.stop()

    print("edgeloop edge chat: type a message, /help for commands, Ctrl-D to quit", file=sys.stderr)
    if config.cloud_url is None:
        print(_no_cloud(config), file=sys.stderr)
    asyncio.run(run())
    return 0


def _no_cloud(config: EdgeConfig) -> str:
    from edge_agent.link import read_identity

    if read_identity(config.state_dir).device_id is not None:
        # Enrolled by an edgeloop that did not keep the URL with the identity.
        why = "this device's identity does not say where it enrolled: name it with --cloud"
    else:
        why = "none configured (--cloud) and none enrolled with"
    return f"no cloud: {why}; everything is answered on the device"


async def _send_what_waits(agent: EdgeAgent, seconds: float) -> int:
    """Before a command ends: queue the routing report, give the cloud up to `seconds` to
    acknowledge what the outbox holds (feedback too); how many messages stay for next time."""
    if agent.link is None or agent.link.outbox is None:
        return 0
    await agent.send_report()
    if await agent.link.wait_outbox_empty(seconds):
        return 0
    return len(agent.link.outbox)


async def _chat_command(conversation: Conversation, text: str, last: str | None) -> None:
    agent = conversation.agent
    command, _, rest = text.partition(" ")
    if command == "/new":
        conversation.clear()
        print("  [new conversation]")
        return
    if command not in ("/good", "/bad"):
        known = command == "/help"
        print(CHAT_HELP if known else f"  [unknown command {command}; /help lists them]")
        return
    if last is None:
        print("  [nothing to rate yet: ask something first]")
    elif agent.link is None:
        print("  [no cloud configured: feedback goes nowhere]")
    else:
        rating: Literal["positive", "negative"] = "positive" if command == "/good" else "negative"
        correction = rest.strip() if command == "/bad" and rest.strip() else None
        await agent.feedback(last, rating, correction)
        print(f"  [{rating} feedback{' with a correction' if correction else ''} queued]")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from edge_agent.http import build_openai_app
    from shared.asgi import SignalFreeServer

    config = _config(args)
    # Bound before the model loads: a port in use is a one-line error naming the setting.
    listener = listen(config.host, config.port, key="port")
    port = listener.getsockname()[1]
    intents = _intents(args.intents)

    async def run() -> None:
        agent = _agent(config, intents)
        await agent.start()
        if agent.link is not None:
            # As `chat` does: the first requests find the cloud, if it is there to be found.
            await agent.link.wait_up(5)
        app = build_openai_app(agent, api_key=config.api_key)
        server = SignalFreeServer(uvicorn.Config(app, log_level="warning"))
        # On SIGINT or SIGTERM the endpoint shuts down, then the agent stops cleanly (sending
        # what waits); uvicorn's own handling would end the process before that.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, setattr, server, "should_exit", True)
        if config.cloud_url is None:
            print(_no_cloud(config), file=sys.stderr)
        if config.api_key is None and not is_loopback(config.host):
            print(
                f"warning: the endpoint on {config.host} answers anyone who can reach it; set "
                f"api_key (EDGELOOP_EDGE__API_KEY) to require a key",
                file=sys.stderr,
            )
        print(f"edgeloop edge endpoint: http://{config.host}:{port}/v1", flush=True)
        try:
            await server.serve(sockets=[listener])
        finally:
            await _send_what_waits(agent, 3)
            await agent.stop()

    asyncio.run(run())
    return 0
