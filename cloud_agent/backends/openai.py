"""`OpenAICompatibleBackend`: any server with `/v1/chat/completions` (vLLM, xLLM, SGLang,
Ollama, llama.cpp server, hosted APIs), over httpx, streaming with server-sent events.

The server's URL may be given as OpenAI's clients take it (`http://host:8000/v1`) or without
the version (`http://host:8000`): either way requests go to `.../v1/chat/completions`.

Connection errors, timeouts, 429 and 5xx answers are retried with exponential backoff
(`tenacity`) before any text has been produced; httpx's exceptions are mapped to ours here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
from httpx_sse import SSEError, aconnect_sse
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from cloud_agent.backends.base import ChatRequest, Completion, StreamItem
from cloud_agent.errors import (
    BackendError,
    BackendResponseError,
    BackendTimeout,
    BackendUnavailable,
)

__all__ = ["OpenAICompatibleBackend"]

_FINISH = {"stop": "stop", "length": "length", "eos": "stop", "end_turn": "stop"}


def _map_error(exc: Exception) -> BackendError:
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"backend timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.TransportError):
        return BackendUnavailable(f"backend unreachable ({type(exc).__name__})")
    if isinstance(exc, (SSEError, ValueError, KeyError, TypeError, IndexError)):
        return BackendResponseError(f"backend answered garbage ({type(exc).__name__})")
    return BackendError(f"backend failed ({type(exc).__name__})")


def api_root(base_url: str) -> str:
    """`base_url` ending in the API version's path: `http://h:8000` and `http://h:8000/v1/`
    both give `http://h:8000/v1`; `https://h/openai/v1` stays as it is."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else f"{root}/v1"


def _check_status(response: httpx.Response) -> None:
    if response.status_code == 429 or response.status_code >= 500:
        raise BackendUnavailable(f"backend answered HTTP {response.status_code}")
    if response.status_code >= 400:
        raise BackendResponseError(f"backend refused the request: HTTP {response.status_code}")


class OpenAICompatibleBackend:
    """A remote OpenAI-compatible chat model."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        attempts: int = 3,
        name: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.model = model
        self.base_url = api_root(base_url)
        self.name = name or f"openai:{model}@{urlsplit(self.base_url).netloc}"
        self.attempts = attempts
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=transport,
        )

    def _body(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": stream,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
            retry=retry_if_exception(lambda e: isinstance(e, BackendError) and e.retryable),
            reraise=True,
        )

    async def complete(self, request: ChatRequest) -> Completion:
        async for attempt in self._retrying():
            with attempt:
                try:
                    response = await self._client.post(
                        "chat/completions", json=self._body(request, stream=False)
                    )
                    _check_status(response)
                    data = response.json()
                    choice = data["choices"][0]
                    text = choice["message"]["content"] or ""
                    usage = data.get("usage") or {}
                    return Completion(
                        text=str(text),
                        finish_reason=_FINISH.get(choice.get("finish_reason") or "stop", "stop"),  # type: ignore[arg-type]
                        prompt_tokens=int(usage.get("prompt_tokens", 0)),
                        completion_tokens=int(usage.get("completion_tokens", 0)),
                        model=str(data.get("model") or self.model),
                    )
                except Exception as exc:  # noqa: BLE001 - mapped to our tree right here
                    raise _map_error(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        produced = False
        async for attempt in self._retrying():
            with attempt:
                try:
                    async for item in self._stream_once(request):
                        produced = True
                        yield item
                    return
                except Exception as exc:  # noqa: BLE001
                    error = _map_error(exc)
                    if produced:
                        # Text already went out: a retry would duplicate it.
                        error.retryable = False
                    raise error from exc

    async def _stream_once(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        parts: list[str] = []
        finish = "stop"
        usage: dict[str, Any] = {}
        model = self.model
        async with aconnect_sse(
            self._client, "POST", "chat/completions", json=self._body(request, stream=True)
        ) as source:
            _check_status(source.response)
            async for sse in source.aiter_sse():
                if sse.data.strip() == "[DONE]":
                    break
                chunk = json.loads(sse.data)
                model = str(chunk.get("model") or model)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        parts.append(piece)
                        yield piece
                    if choice.get("finish_reason"):
                        finish = _FINISH.get(choice["finish_reason"], "stop")
        yield Completion(
            text="".join(parts),
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", len(parts))),
            model=model,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
