"""The look-alike channel's vectors, kept up to date off the request path.

Where the data comes from: the gateway, when ReportEvents carries a consuming event on a new
item, records the user among the item's first K engagers in the feature store
(`FeatureStore.record_engagers`: ids, bounded per item, one revision counter). This poller
reads that revision every `poll_seconds` (one GET); only when it moved, or the live catalogue
or the servable versions changed, it reads the engagers, embeds the users it has not embedded
yet with each version's user tower (their feature-store state: snapshot and live events, one
pipelined read), and builds a `LookAlikeSource` per version, in a thread.

Why this shape:
- the request path costs one [engaged new items × dim] product with the embedding the
  two-tower channel computes anyway: no feature-store read, no extra tower run;
- the store holds ids, not vectors: each version's user tower embeds users its own way, so a
  new version gets vectors of its own at its first poll, and nothing is tied to one model;
- a user is embedded once, when first seen as an engager (their taste when they engaged, as
  an accumulator of sums would hold), so a poll after a few new events embeds a few users,
  not every engager again; the cache holds only users who are still someone's engagers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from recsys.artifacts import FloatArray
from recsys.catalogue import CatalogueWatcher, Models, NewItems
from recsys.feature_store import FeatureStore, UserState
from recsys.polling import Poller
from recsys.serving_model import ServingModel
from recsys.stages.query import UserHistory, build_query
from recsys.stages.sources import LOOK_ALIKE_ENGAGERS, LookAlikeSource, look_alike_vectors

log = logging.getLogger("recsys.recall")

DEFAULT_POLL_SECONDS = 2.0
STATE_BATCH = 256  # users per pipelined feature-store read


@dataclass(frozen=True)
class _Built:
    engagers_revision: int
    catalogue_revision: int
    source: LookAlikeSource | None


def embed_states(model: ServingModel, user_ids: Sequence[str], states: Sequence[UserState]) -> FloatArray:
    """The user tower's embedding of each user from their feature-store state (as the
    two-tower channel computes it for a request)."""
    inputs = []
    for user_id, state in zip(user_ids, states, strict=True):
        history = UserHistory.from_state(state, model.item_lookup, model.core.like_threshold)
        query = build_query(
            model.core,
            model.user_lookup.get(user_id, -1),
            recent_limit=model.defaults.recent_items,
            region_token=history.region or None,
            history_items=history.items,
            history_liked=history.liked,
        )
        inputs.append(model.user_inputs(query))
    return model.user_embeddings(inputs)


class LookAlikeIndex(Poller):
    """Per servable version, the look-alike channel's source over the live catalogue's view
    (None while no new item has an engager). `source(version)` is a dict lookup."""

    def __init__(
        self,
        features: FeatureStore,
        models: Models,
        catalogue: CatalogueWatcher,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        *,
        engagers_per_item: int = LOOK_ALIKE_ENGAGERS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(poll_seconds, name="look-alike", log=log, what="refreshing the look-alike vectors")
        self._features = features
        self._models = models
        self._catalogue = catalogue
        self._engagers_per_item = engagers_per_item
        self._clock = clock
        self._engagers: dict[str, tuple[str, ...]] = {}
        self._engagers_revision = 0
        self._built: dict[str, _Built] = {}
        self._embedded: dict[str, dict[str, FloatArray]] = {}  # version → user → embedding

    def source(self, version: str) -> LookAlikeSource | None:
        built = self._built.get(version)
        return None if built is None else built.source

    async def poll(self) -> bool:
        """One poll: True when some version's source was rebuilt."""
        self.polls += 1
        revision = await self._features.engagers_revision()
        if revision != self._engagers_revision:
            self._engagers = await self._features.engagers()
            self._engagers_revision = revision
        changed = False
        models = list(self._models())
        for version, model in models:
            view = self._catalogue.view(version)
            built = self._built.get(version)
            catalogue_revision = 0 if view is None else view.revision
            if built is not None and (built.engagers_revision, built.catalogue_revision) == (
                revision,
                catalogue_revision,
            ):
                continue
            source = None if view is None else await self._build(version, model, view)
            self._built[version] = _Built(revision, catalogue_revision, source)
            changed = True
        servable = {version for version, _ in models}
        for version in [version for version in self._built if version not in servable]:
            del self._built[version]
            self._embedded.pop(version, None)
        return changed

    async def _build(self, version: str, model: ServingModel, view: NewItems) -> LookAlikeSource | None:
        withdrawn = set(view.withdrawn.tolist())
        items: list[int] = []
        users_of: list[tuple[str, ...]] = []
        for item_id, users in self._engagers.items():
            index = view.index_of.get(item_id)
            if index is not None and index not in withdrawn and users:
                items.append(index)
                users_of.append(users[: self._engagers_per_item])
        if not items:
            return None
        wanted = {user for users in users_of for user in users}
        embedded = {
            user: vector for user, vector in self._embedded.get(version, {}).items() if user in wanted
        }
        missing = sorted(wanted - embedded.keys())
        for start in range(0, len(missing), STATE_BATCH):
            batch = missing[start : start + STATE_BATCH]
            states = await self._features.users_states(version, batch, now=self._clock())
            vectors = await asyncio.to_thread(embed_states, model, batch, states)
            embedded.update(zip(batch, vectors, strict=True))
        self._embedded[version] = embedded
        return await asyncio.to_thread(_source, items, users_of, embedded, self._engagers_per_item)


def _source(
    items: Sequence[int],
    users_of: Sequence[tuple[str, ...]],
    embedded: Mapping[str, FloatArray],
    limit: int,
) -> LookAlikeSource:
    names = sorted(embedded)
    row = {user: position for position, user in enumerate(names)}
    matrix = np.stack([embedded[user] for user in names]).astype(np.float32)
    vectors, _ = look_alike_vectors([[row[user] for user in users] for users in users_of], matrix, limit)
    return LookAlikeSource(np.asarray(items, dtype=np.int32), vectors)
