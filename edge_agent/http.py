"""A local OpenAI-compatible endpoint for the edge agent, on 127.0.0.1 by default (with an API key
when it must serve beyond the device).

`/v1/chat/completions` (plain and SSE streaming) and `/v1/models`, so apps in any language on
the device, and the official OpenAI client, use the edge agent unchanged. The conversation's
earlier user and assistant turns go along with its last user message (`EdgeAgent.ask`'s
`history`), as do `max_tokens` and `stop` (the device decodes greedily: sampling options change
nothing). The route taken is in the ``X-Edgeloop-Route`` header and in an extra ``edgeloop``
field of the completion, with the `request_id` that `/v1/feedback` rates the answer by (not an
OpenAI endpoint: the user's thumbs up or down, and a correction, go through the device's outbox
to the cloud, which learns from them and watches its adapters' rollouts by them).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_agent.agent import MAX_TOKENS, EdgeAgent, Reply, Turn
from edge_agent.errors import EdgeAgentError
from edge_agent.local_model import ContextTooLong
from edge_agent.router import RouteDecision

__all__ = ["build_openai_app"]

T = TypeVar("T")
COMPLETION_PREFIX = "chatcmpl-"
"""A completion's id is this and the request id of its answer."""


def _error(
    status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code}}, status_code=status
    )


def _failure(exc: EdgeAgentError) -> JSONResponse:
    """An answer the device could not give, as the OpenAI API reports it."""
    if isinstance(exc, ContextTooLong):
        return _error(400, str(exc), code="context_length_exceeded")
    return _error(500, f"the device could not answer: {exc}", kind="server_error")


def _usage(reply: Reply | None) -> dict[str, int]:
    prompt, completion = (reply.prompt_tokens, reply.tokens) if reply else (0, 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _route_info(decision: RouteDecision, reply: Reply | None, request_id: str) -> dict[str, Any]:
    return {
        "route": decision.target.value,
        "reasons": list(decision.reasons),
        "from_cloud": bool(reply and reply.from_cloud),
        "fallback_reason": reply.fallback_reason if reply else None,
        "request_id": request_id,
    }


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result (reading an answer), unless the client disconnects first: then `work`
    is cancelled, which gives the answer up (the device stops decoding, a cloud request is
    cancelled), and `_ClientGone` raised. Left to run, an abandoned answer would hold the
    device's one model from the next request."""

    async def disconnected() -> None:
        # The body was read: what the server hands over next is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _ClientGone
    return task.result()


def _conversation(messages: Any) -> list[Turn]:
    """The user and assistant turns of OpenAI-style `messages`, text content only. System (and
    developer) messages are left out: the device answers with its own system prompt, the one
    its adapters were trained with."""
    if not isinstance(messages, list):
        raise TypeError("messages must be a list")
    turns = []
    for message in messages:
        role, content = message["role"], message.get("content")
        if role in ("system", "developer"):
            continue
        if role not in ("user", "assistant"):
            raise ValueError(f"messages with the role {role!r} are not supported")
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise ValueError("only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise TypeError(f"a {role} message's content must be text")
        turns.append(Turn(role, content))
    return turns


def build_openai_app(
    agent: EdgeAgent, *, model_name: str = "edgeloop-edge", api_key: str | None = None
) -> Starlette:
    """The endpoint for `agent`. With `api_key`, every request must carry it as OpenAI's
    clients send theirs (``Authorization: Bearer KEY``); a request without it is a 401."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    def guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
        async def check(request: Request) -> Response:
            given = request.headers.get("authorization", "").encode()
            if expected is not None and not hmac.compare_digest(given, expected):
                return _error(
                    401, "a valid API key is required (Authorization: Bearer KEY)",
                    code="invalid_api_key",
                )  # fmt: skip
            return await endpoint(request)

        return check

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": model_name, "object": "model", "owned_by": "edgeloop"}],
            }
        )

    async def completions(request: Request) -> Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError
            turns = _conversation(body["messages"])
        except (ValueError, KeyError, TypeError) as exc:
            detail = f": {exc}" if str(exc) else ""
            return _error(
                400, f"expected {{messages: [..., {{role: 'user', content: '...'}}]}}{detail}"
            )
        if not turns or turns[-1].role != "user" or not turns[-1].text.strip():
            return _error(400, "the last message must be the user's, and not blank")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            return _error(400, f"max_tokens must be an integer from 1 to {MAX_TOKENS}")
        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif not isinstance(stop, str | list):  # the agent checks each string
            return _error(400, "stop must be a string or a list of strings")
        if body.get("n", 1) != 1:
            return _error(400, "n must be 1: the device gives one answer")
        response_format = body.get("response_format")
        if response_format is not None and (
            not isinstance(response_format, dict) or response_format.get("type") != "text"
        ):
            return _error(400, "response_format: only text answers are supported")
        created = int(time.time())
        try:
            # Checks the range of max_tokens, the stop strings and the conversation's size.
            stream = agent.stream(turns[-1].text, history=turns[:-1], max_tokens=limit, stop=stop)
        except ValueError as exc:
            return _error(400, str(exc))
        decision = await stream.start()
        headers = {"X-Edgeloop-Route": decision.target.value}
        # Every chunk of a stream, too: `/v1/feedback` takes it (or `edgeloop.request_id`).
        completion_id = f"{COMPLETION_PREFIX}{stream.request_id}"
        # The first piece before any response: a request the device cannot answer (too long
        # for its context) is an error status, not a 200 whose stream breaks off.
        try:
            first = await _unless_gone(request, anext(stream, None))
        except EdgeAgentError as exc:
            return _failure(exc)
        except _ClientGone:
            return Response(status_code=499)
        if not body.get("stream"):

            async def rest() -> list[str]:
                return [piece async for piece in stream]

            try:
                text = "".join([first or "", *await _unless_gone(request, rest())])
            except EdgeAgentError as exc:
                return _failure(exc)
            except _ClientGone:
                return Response(status_code=499)
            reply = stream.reply
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model_name,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": reply.finish_reason if reply else "stop",
                            "message": {"role": "assistant", "content": text},
                        }
                    ],
                    "usage": _usage(reply),
                    "edgeloop": _route_info(decision, reply, stream.request_id),
                },  # fmt: skip
                headers=headers,
            )

        async def events() -> AsyncIterator[str]:
            def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> str:
                payload = {
                    "id": completion_id, "object": "chat.completion.chunk",
                    "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra,
                }  # fmt: skip
                return f"data: {json.dumps(payload)}\n\n"

            yield chunk({"role": "assistant"}, None)
            if first is not None:
                yield chunk({"content": first}, None)
            try:
                async for piece in stream:
                    yield chunk({"content": piece}, None)
            except EdgeAgentError as exc:
                # Mid-stream the status is sent: say so in the stream, as OpenAI servers do.
                error = {"message": f"the device could not answer: {exc}", "type": "server_error"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                yield "data: [DONE]\n\n"
                return
            finally:
                # A client that went away mid-stream: the answer is given up on at once.
                await stream.aclose()
            finish = stream.reply.finish_reason if stream.reply else "stop"
            yield chunk({}, finish, edgeloop=_route_info(decision, stream.reply, stream.request_id))
            if include_usage:
                # As OpenAI sends it when asked: a last chunk with no choices and the usage.
                payload = {
                    "id": completion_id, "object": "chat.completion.chunk",
                    "created": created, "model": model_name, "choices": [],
                    "usage": _usage(stream.reply),
                }  # fmt: skip
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def feedback(request: Request) -> Response:
        """The user's verdict on an answer, queued durably for the cloud (`agent.feedback`)."""
        if agent.link is None:
            return _error(409, "this device has no cloud link to send feedback to")
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise TypeError("expected a JSON object")
            request_id, rating = body["request_id"], body["rating"]
            correction = body.get("correction")
            if rating not in ("positive", "negative"):
                raise ValueError("rating must be 'positive' or 'negative'")
            if not isinstance(request_id, str) or not (
                correction is None or isinstance(correction, str)
            ):
                raise TypeError("request_id and correction must be text")
            # The completion's id names its request too.
            request_id = request_id.removeprefix(COMPLETION_PREFIX)
            await agent.feedback(request_id, rating, correction)
        except ValidationError as exc:  # a malformed id, a correction too long for a message
            first = exc.errors()[0]
            detail = f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
            return _error(400, f"feedback refused: {detail}")
        except (ValueError, KeyError, TypeError) as exc:
            detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            shape = "{request_id, rating: 'positive'|'negative', correction?}"
            return _error(400, f"expected {shape}: {detail}")
        except EdgeAgentError as exc:
            return _error(503, f"feedback not queued: {exc}", kind="server_error")
        return JSONResponse({"queued": True}, status_code=202)

    return Starlette(
        routes=[
            Route("/v1/models", guarded(models)),
            Route("/v1/chat/completions", guarded(completions), methods=["POST"]),
            Route("/v1/feedback", guarded(feedback), methods=["POST"]),
        ]
    )
