"""The router: where a request is answered, decided from cheap signals, with its reasons.

Signals, in order: personal data whose policy is `local_only` (the request stays on the device,
whatever else says, an app override included); an app override; privacy (other personal data
keeps the request on the device unless it clearly needs the cloud); the app's intents (nearest
example utterance); coverage shipped with the latest update bundle (request kinds the active
adapter answers well); difficulty cues (length, multi-step asks, comparisons, writing tasks); the
link and cloud back-pressure; device load.

`threshold` is the one knob: a request is kept local when its match score (intent or coverage,
minus difficulty) reaches it. Lower keeps more on the device (cheaper), higher sends more to the
cloud (better answers). `calibrate` sets it from labelled requests to reach a target local share.
A decision takes well under a millisecond: no model is called.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from edge_agent.privacy import PlaceholderMap, Redactor

__all__ = [
    "Coverage",
    "IntentIndex",
    "SMALL_TALK",
    "SMALL_TALK_REPLIES",
    "RouteDecision",
    "Router",
    "Target",
    "calibrate",
    "difficulty",
]

_WORD = re.compile(r"[a-z0-9]+")
_CUES: tuple[tuple[str, float, re.Pattern[str]], ...] = (
    ("difficulty.comparison", 0.35, re.compile(
        r"\b(compare|comparison|versus|vs\.?|difference|differences|better|which is best)\b")),
    ("difficulty.multi_step", 0.3, re.compile(
        r"\b(and then|step by step|plan|first .* then|itinerary)\b")),
    ("difficulty.writing", 0.3, re.compile(
        r"\b(write|draft|explain|describe|recommend|analy[sz]e|help me choose|how should|"
        r"how do i choose|what .* recommend|why)\b")),
)  # fmt: skip


class Target(StrEnum):
    LOCAL = "local"
    CLOUD = "cloud"
    LOCAL_ONLY = "local_only"
    LOCAL_FALLBACK = "local_fallback"


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a request goes and why."""

    target: Target
    reasons: tuple[str, ...]
    scores: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    intent: str | None = None

    @property
    def local(self) -> bool:
        return self.target is not Target.CLOUD

    def explain(self) -> str:
        scores = ", ".join(f"{k}={v:.2f}" for k, v in self.scores.items())
        return f"{self.target.value}: {', '.join(self.reasons)}" + (
            f" ({scores})" if scores else ""
        )


def _features(text: str) -> tuple[frozenset[str], frozenset[str]]:
    lowered = text.lower()
    words = frozenset(
        w[:-1] if len(w) > 3 and w.endswith("s") else w for w in _WORD.findall(lowered)
    )
    squashed = f" {' '.join(_WORD.findall(lowered))} "
    grams = frozenset(squashed[i : i + 3] for i in range(len(squashed) - 2))
    return words, grams


def _similarity(
    a: tuple[frozenset[str], frozenset[str]], b: tuple[frozenset[str], frozenset[str]]
) -> float:
    def dice(x: frozenset[str], y: frozenset[str]) -> float:
        return 2 * len(x & y) / (len(x) + len(y)) if x and y else 0.0

    return 0.5 * dice(a[0], b[0]) + 0.5 * dice(a[1], b[1])


SMALL_TALK: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "greet": ("hello", "hi", "hey there", "good morning", "good afternoon", "good evening",
                  "hello, can you help me", "hey, how are you"),
        "thanks": ("thanks", "thank you", "thanks a lot", "thanks, that helps", "cheers",
                   "great, thanks", "ok great", "nice one"),
        "goodbye": ("bye", "goodbye", "see you later", "i'm done", "thanks, bye", "no thanks"),
        "about_assistant": ("are you a robot", "what's your name", "who are you"),
    }
)  # fmt: skip
"""Intents every assistant has, whatever its app: the device answers them itself. `edgeloop
edge chat` and `serve` use them, with `SMALL_TALK_REPLIES`, when no intents file is given; an
app adds them with `agent.intent(name, examples, reply)` next to its own."""

SMALL_TALK_REPLIES: Mapping[str, str] = MappingProxyType(
    {
        "greet": "Hello! How can I help you today?",
        "thanks": "You're welcome! Anything else I can help with?",
        "goodbye": "Goodbye, and have a good day!",
        "about_assistant": "I'm the assistant on this device: I answer what I can here and ask "
        "the cloud for the rest.",
    }
)
"""What the device says to small talk, whatever its app: a small model left to answer a
greeting itself chats about whatever comes to it."""


class IntentIndex:
    """The app's intents, matched to a request by its nearest example utterance."""

    def __init__(self) -> None:
        self._examples: list[tuple[str, tuple[frozenset[str], frozenset[str]]]] = []
        self.local_only: set[str] = set()
        """Intents whose requests never leave the device (the app's privacy class)."""

    def add(self, name: str, examples: Iterable[str], *, local_only: bool = False) -> None:
        self._examples += [(name, _features(e)) for e in examples]
        if local_only:
            self.local_only.add(name)

    def match(self, text: str) -> tuple[str | None, float]:
        features = _features(text)
        best, score = None, 0.0
        for name, example in self._examples:
            s = _similarity(features, example)
            if s > score:
                best, score = name, s
        return best, score

    def __len__(self) -> int:
        return len(self._examples)


@dataclass(frozen=True)
class Coverage:
    """What the active adapter answers well: example requests with their measured accuracy."""

    examples: tuple[tuple[str, float], ...] = ()
    _features: tuple[tuple[tuple[frozenset[str], frozenset[str]], float], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # Featurised once here: `match` runs on every routing decision.
        object.__setattr__(self, "_features", tuple((_features(e), a) for e, a in self.examples))

    def match(self, text: str) -> float:
        features = _features(text)
        return max(
            (_similarity(features, example) * accuracy for example, accuracy in self._features),
            default=0.0,
        )


def difficulty(text: str) -> tuple[float, tuple[str, ...]]:
    """How hard a request looks, from cues, and which cues fired."""
    lowered = text.lower()
    score, reasons = 0.0, []
    for reason, weight, pattern in _CUES:
        if pattern.search(lowered):
            score += weight
            reasons.append(reason)
    words = len(lowered.split())
    if words > 16:
        score += 0.2
        reasons.append("difficulty.long")
    return score, tuple(reasons)


class Router:
    """Decides local or cloud for each request, and counts its decisions."""

    def __init__(
        self,
        intents: IntentIndex,
        *,
        redactor: Redactor | None = None,
        threshold: float = 0.5,
        coverage: Coverage | None = None,
    ) -> None:
        self.intents = intents
        self.redactor = redactor or Redactor()
        self.threshold = threshold
        self.coverage = coverage or Coverage()
        self.counts: Counter[str] = Counter()

    def decide(
        self,
        text: str,
        *,
        override: Target | None = None,
        link_up: bool = True,
        backpressure: bool = False,
        device_busy: bool = False,
        context: Sequence[str] = (),
    ) -> RouteDecision:
        """Where `text` is answered. `context` is the conversation before it (earlier turns,
        which go to the cloud with it): personal data there whose policy is `local_only` keeps
        the request on the device, as it would in `text`."""
        decision = self._decide(text, override, link_up, backpressure, device_busy, context)
        self.counts[decision.target.value] += 1
        for reason in decision.reasons:
            self.counts[reason] += 1
        return decision

    def _decide(
        self,
        text: str,
        override: Target | None,
        link_up: bool,
        backpressure: bool,
        busy: bool,
        context: Sequence[str],
    ) -> RouteDecision:
        redaction = self.redactor.redact(text, PlaceholderMap())
        scans = (self.redactor.redact(turn, PlaceholderMap()) for turn in context)
        earlier = tuple(kind for scan in scans for kind in scan.local_only)
        if redaction.local_only or earlier:
            # No placeholder stands in for such a value: sent, it would leave as it is.
            found = dict.fromkeys((*redaction.local_only, *earlier))
            kinds = tuple(f"privacy.local_only.{k.value}" for k in found)
            history = ("privacy.context",) if earlier else ()
            refused = ("app.override.refused",) if override is not None else ()
            return RouteDecision(Target.LOCAL_ONLY, (*kinds, *history, *refused))
        if override is not None:
            return RouteDecision(override, ("app.override",))
        intent, intent_score = self.intents.match(text)
        if intent in self.intents.local_only and intent_score >= self.threshold:
            return RouteDecision(
                Target.LOCAL_ONLY, (f"intent.{intent}", "privacy.intent"), {}, intent
            )
        hard, cues = difficulty(text)
        covered = self.coverage.match(text)
        scores = {"intent": round(intent_score, 3), "coverage": round(covered, 3),
                  "difficulty": round(hard, 3)}  # fmt: skip
        if redaction.kinds:
            # Privacy-sensitive requests are answered on the device; only requests that
            # clearly need the cloud go there, redacted.
            kinds = tuple(f"privacy.{k.value}" for k in redaction.kinds)
            if hard < 0.3 or not link_up:
                return RouteDecision(Target.LOCAL, kinds, scores, intent)
            return RouteDecision(Target.CLOUD, (*kinds, "privacy.redacted", *cues), scores)
        if intent_score - hard >= self.threshold:
            return RouteDecision(Target.LOCAL, (f"intent.{intent}",), scores, intent)
        if covered - hard >= self.threshold and not busy:
            return RouteDecision(Target.LOCAL, ("coverage.match",), scores)
        if not link_up:
            return RouteDecision(Target.LOCAL_FALLBACK, ("link.down",), scores)
        if backpressure:
            return RouteDecision(Target.LOCAL_FALLBACK, ("cloud.backpressure",), scores)
        reasons = ("intent.unknown", *cues) + (("device.load",) if busy else ())
        return RouteDecision(Target.CLOUD, reasons, scores)


def calibrate(router: Router, texts: Sequence[str], target_local_share: float) -> float:
    """Set `router.threshold` so that about `target_local_share` of `texts` stay local.

    Returns the threshold. Requests that privacy keeps local count as local whatever the knob.
    """
    if not 0.0 <= target_local_share <= 1.0:
        raise ValueError("target_local_share must be within [0, 1]")
    margins = []
    forced = 0
    for text in texts:
        redaction = router.redactor.redact(text, PlaceholderMap())
        if redaction.kinds:
            forced += 1
            continue
        _, intent_score = router.intents.match(text)
        hard, _ = difficulty(text)
        margins.append(max(intent_score, router.coverage.match(text)) - hard)
    wanted = round(target_local_share * len(texts)) - forced
    # Scores tie (several requests match an example exactly): choose, among the thresholds
    # that make a difference, the one whose local count comes closest to what was asked.
    candidates = sorted(set(margins), reverse=True)
    best, best_gap = (candidates[0] + 1e-6) if candidates else 1.0, abs(wanted)
    for value in candidates:
        gap = abs(sum(1 for m in margins if m >= value) - wanted)
        if gap < best_gap:
            best, best_gap = value, gap
    router.threshold = best
    return best
