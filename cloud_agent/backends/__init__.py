"""LLM backends behind one small interface (`LLMBackend`), and a load-aware pool of them."""

from cloud_agent.backends.base import ChatRequest, ChatTurn, Completion, LLMBackend, StreamItem
from cloud_agent.backends.scripted import ScriptedBackend

__all__ = [
    "ChatRequest",
    "ChatTurn",
    "Completion",
    "LLMBackend",
    "ScriptedBackend",
    "StreamItem",
]
