"""`Curator`: keeps the cloud agent's knowledge index current while the service runs.

- learns from feedback: at start all that the store holds, then what other replicas took,
  every `knowledge_poll_s` (this replica's own is learned as it arrives, `Inbox`);
- reloads the knowledge file on request (admin API, SIGHUP) or when it changes on disk
  (`knowledge_watch`), relearning the questions of the facts whose text did not change; a
  reload on request is announced to the other replicas (`KNOWLEDGE`), which reload theirs, so
  replicas behind one load balancer answer from the same facts;
- unlearns a forgotten device: the questions are learned again from the feedback left in the
  store, so what that device's users taught is gone from memory as it is from the store.

Each rebuild makes a new index beside the one answering, then swaps it in: requests never see
a half-built one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cloud_agent.agent import CloudAgent
from cloud_agent.cluster import Cluster
from cloud_agent.config import CloudConfig
from cloud_agent.errors import KnowledgeError, StoreError
from cloud_agent.knowledge import KnowledgeBase
from cloud_agent.metrics import Metrics
from cloud_agent.skills import KnowledgeSkill
from cloud_agent.store import Store

__all__ = ["KNOWLEDGE", "Curator"]

log = logging.getLogger("edgeloop.cloud.knowledge")

KNOWLEDGE = "edgeloop_knowledge"
"""The channel a reload on request is announced on (payload: the announcing replica's id)."""
SETTLE_S = 1.0
"""A knowledge file modified less than this long ago is left until the next look."""


class Curator:
    def __init__(
        self,
        config: CloudConfig,
        *,
        store: Store,
        agent: CloudAgent,
        metrics: Metrics,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = config
        self.cluster = cluster
        if cluster is not None:
            cluster.subscribe(KNOWLEDGE, self._reload_elsewhere)
        self.store = store
        self.agent = agent
        """Holds the skill answering now (`agent.skill`), which a rebuild replaces."""
        self.metrics = metrics
        self.loaded_at = datetime.now(UTC)
        self._stamp = file_stamp(config.knowledge)
        """The knowledge file's identity when it was last read (see `_reload_if_changed`)."""
        self._rebuilding = asyncio.Lock()
        if config.knowledge is not None and agent.skill is None:
            agent.skill = self.skill(KnowledgeBase.from_file(config.knowledge))
        if agent.skill is not None:
            metrics.knowledge_facts.set(len(agent.skill.kb))

    def skill(self, kb: KnowledgeBase) -> KnowledgeSkill:
        """The knowledge skill over `kb`, as configured."""
        return KnowledgeSkill(
            kb,
            store_name=self.config.store_name,
            quote_facts=self.config.quote_facts,
            top_k=self.config.knowledge_top_k,
            context_turns=self.config.knowledge_context_turns,
            context_drift=self.config.knowledge_context_drift,
        )

    def info(self) -> dict[str, Any]:
        """What the knowledge index holds now (for the admin API)."""
        skill = self.agent.skill
        return {
            "path": str(self.config.knowledge) if self.config.knowledge else None,
            "facts": len(skill.kb) if skill else 0,
            "learned": skill.kb.learned if skill else 0,
            "loaded_at": self.loaded_at.isoformat() if skill else None,
        }

    async def reload(self, *, announce: bool = True) -> dict[str, Any]:
        """Read the knowledge file again and answer from it from now on (the admin API's
        `POST /v1/knowledge/reload`, or SIGHUP to `edgeloop cloud serve`); once it is loaded,
        the other replicas are told to reload theirs (unless `announce` is False).

        Questions learned from feedback are learned again for the facts whose text did not
        change (a correction or a thumbs-up vouched for that text, not for a new one). A file
        that cannot be read or holds no facts raises `KnowledgeError`, and the facts in use
        stay; so do they when the store cannot be read for the feedback (`StoreError`).
        Returns the ids of the facts added, removed and changed."""
        path = self.config.knowledge
        if path is None:
            raise KnowledgeError("no knowledge file is configured (--knowledge)")
        async with self._rebuilding:
            started = datetime.now(UTC)
            # Taken before reading: a change made while the file is read is seen next time.
            self._stamp = file_stamp(path)
            try:
                kb = await asyncio.to_thread(KnowledgeBase.from_file, path)
            except KnowledgeError:
                self.metrics.knowledge_reloads.labels("refused").inc()
                raise
            old = self.agent.skill.kb.facts if self.agent.skill is not None else {}
            await self._swap_in(kb, started)
            self.loaded_at = started
            self.metrics.knowledge_reloads.labels("ok").inc()
        changes = {
            "added": sorted(kb.facts.keys() - old.keys()),
            "removed": sorted(old.keys() - kb.facts.keys()),
            "changed": sorted(i for i in kb.facts.keys() & old.keys() if kb.facts[i] != old[i]),
        }
        log.info("knowledge reloaded from %s: %d facts, %s", path, len(kb), changes)
        if announce and self.cluster is not None:
            await self.cluster.notify(KNOWLEDGE, self.cluster.replica_id)
        return {**self.info(), **changes}

    async def _reload_elsewhere(self, announcer: str) -> None:
        if self.cluster is None or announcer == self.cluster.replica_id:
            return  # this replica's own reload, heard back
        try:
            await self.reload(announce=False)
        except (KnowledgeError, StoreError) as exc:
            log.warning("knowledge: another replica reloaded, this one could not (%s)", exc)

    async def unlearn(self) -> int:
        """Learn the questions again from the feedback the store holds now, after a device
        was forgotten. Returns how many questions the index learned. Raises `StoreError`
        when the store cannot be read (the index in use stays)."""
        if self.agent.skill is None:
            return 0
        async with self._rebuilding:
            facts = list(self.agent.skill.kb.facts.values())
            kb = await asyncio.to_thread(KnowledgeBase, facts)
            skill = await self._swap_in(kb, datetime.now(UTC))
        log.info("knowledge: learned again without a forgotten device's feedback")
        return skill.kb.learned

    async def _swap_in(self, kb: KnowledgeBase, started: datetime) -> KnowledgeSkill:
        skill = self.skill(kb)
        await self.learn_from_store(skill)
        self.agent.skill = skill
        self.metrics.knowledge_facts.set(len(kb))
        # Feedback taken while the new index was built went to the old one: read it again
        # (if that fails, the periodic read of other replicas' feedback catches up).
        try:
            await self.learn_from_store(skill, since=started - timedelta(minutes=1))
        except StoreError as exc:
            log.warning("knowledge: recent feedback not read after the rebuild (%s)", exc)
        return skill

    async def learn_from_store(
        self, skill: KnowledgeSkill | None = None, since: datetime | None = None
    ) -> None:
        """Attach the questions users corrected or confirmed to their facts, oldest first so
        the latest feedback wins (all of it, or what was stored since `since`), in `skill`'s
        index (by default the one answering now)."""
        skill = skill or self.agent.skill
        if skill is None:
            return
        rated = await self.store.list_interactions(
            limit=100_000, rated_only=True, rated_since=since
        )
        # Each question is embedded: on a worker thread, not the event loop.
        learned = await asyncio.to_thread(
            lambda: sum(skill.learn(record) for record in reversed(rated))
        )
        if learned:
            self.metrics.learned.inc(learned)
            log.info("knowledge: %d questions learned from feedback", learned)

    async def follow_replicas(self) -> None:
        """Feedback taken by this replica is learned at once; what other replicas took is read
        from the store every `knowledge_poll_s`. Learning is idempotent, so the windows overlap
        by a minute to absorb clock differences between replicas."""
        checked = datetime.now(UTC)
        while True:
            await asyncio.sleep(self.config.knowledge_poll_s)
            now = datetime.now(UTC)
            try:
                await self.learn_from_store(since=checked - timedelta(minutes=1))
            except StoreError as exc:
                log.warning("knowledge: feedback not read (%s); trying again", exc)
                continue
            checked = now
            if self.config.knowledge_watch:
                await self._reload_if_changed()

    async def _reload_if_changed(self) -> None:
        """Reload the knowledge file if it is not the one last read (another modification
        time, size or inode: an edit, or a new file moved into place). A file that is refused
        is not tried again until it changes once more; one that could not be reloaded because
        the store was down is tried again at the next look."""
        path = self.config.knowledge
        stamp = file_stamp(path)
        if path is None or stamp == self._stamp:
            return
        if stamp is not None and time.time() - stamp[0] / 1e9 < SETTLE_S:
            return  # still being written, perhaps: look again next time
        try:
            await self.reload(announce=False)  # every replica watches its own file
        except KnowledgeError as exc:
            log.warning("knowledge: the changed file was not loaded (%s); facts in use stay", exc)
        except StoreError as exc:
            self._stamp = None  # look again next time
            log.warning("knowledge: reload postponed, the store is unavailable (%s)", exc)


def file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What tells one version of a file from another without reading it: modification time,
    size and inode (None when there is no file)."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
