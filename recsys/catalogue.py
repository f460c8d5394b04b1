"""The live catalogue as the services serve it: items upserted while serving (`UpsertItems`)
and withdrawn ids, polled from the feature store and laid out per model version.

A model version knows items 0 … n_items − 1. An upserted item the version does not know is
served as dense index `n_items + ordinal` (its ordinal is assigned once by the feature store,
so recall, rank and the gateway, in any process, agree on it without talking to each other),
a space beside the version's own that a later build can absorb. An upserted id the version
already knows keeps the version's index (its stored metadata waits for the next build).
Withdrawn ids, the version's own included, are served nowhere.

`NewItems` is that layout for one (version, catalogue revision): built off the request path
(`CatalogueWatcher`, in a thread) and read by requests without any work when the catalogue is
empty (`view()` is None then). Its metadata tokens are the version's vocabularies (categories
and authors the version has never seen are token 0), which is what the version's ranker and
the rerank rules can read; the raw metadata stays in the feature store for a content tower and
the next build.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.artifacts import Catalogue, FloatArray, IntArray
from recsys.feature_store import CatalogueItem, CatalogueState, FeatureStore, StoredItem
from recsys.polling import Poller
from recsys.stages.sources import CandidateSource, NewItemSource

log = logging.getLogger("recsys.catalogue")

DEFAULT_POLL_SECONDS = 2.0


def _token_lookup(vocabulary: npt.NDArray[Any]) -> dict[str, int]:
    """Name → token (index + 1), compared case-folded and stripped: an operator's CSV and the
    build's data rarely agree on case."""
    lookup: dict[str, int] = {}
    for token, name in enumerate(vocabulary.tolist(), start=1):
        lookup.setdefault(str(name).strip().casefold(), token)
    return lookup


@dataclass(frozen=True)
class VersionVocabulary:
    """A version's category and author tokens by name (built once per version)."""

    categories: Mapping[str, int]
    authors: Mapping[str, int]
    max_categories: int

    @classmethod
    def of(cls, catalogue: Catalogue) -> VersionVocabulary:
        return cls(
            _token_lookup(catalogue.category_vocab),
            _token_lookup(catalogue.author_vocab),
            int(catalogue.categories.shape[1]),
        )

    def author_token(self, name: str) -> int:
        return self.authors.get(name.strip().casefold(), 0)

    def category_tokens(self, names: Sequence[str]) -> list[int]:
        """The known categories' tokens, in order, at most `max_categories` (unknown dropped)."""
        tokens = [self.categories.get(name.strip().casefold(), 0) for name in names]
        return [token for token in tokens if token > 0][: self.max_categories]


class NewItems:
    """The live catalogue for one model version at one revision (immutable once built)."""

    def __init__(
        self,
        version: str,
        revision: int,
        n_items: int,
        item_lookup: Mapping[str, int],
        vocabulary: VersionVocabulary,
        state: CatalogueState,
        now: float,
    ) -> None:
        self.version = version
        self.revision = revision
        self.base = n_items
        self._item_lookup = item_lookup
        size = max((entry.ordinal for entry in state.items), default=-1) + 1
        # By ordinal: an ordinal whose id the version knows (or no item holds) stays empty.
        self.ids: list[str] = [""] * size
        self.titles: list[str] = [""] * size
        self.items: list[CatalogueItem | None] = [None] * size  # the metadata, for the item tower
        self.known = np.zeros(size, dtype=bool)
        self.authors = np.zeros(size, dtype=np.int32)
        self.categories = np.zeros((size, vocabulary.max_categories), dtype=np.int32)
        self.times = np.zeros(size, dtype=np.float64)
        self.upserted_at = np.zeros(size, dtype=np.float64)  # unix seconds of the latest upsert
        self.index_of: dict[str, int] = {}
        withdrawn_own: list[int] = []
        withdrawn_new: list[int] = []
        for entry in state.items:
            item = entry.item
            if item.item_id in item_lookup:
                continue
            ordinal = entry.ordinal
            self.ids[ordinal] = item.item_id
            self.titles[ordinal] = item.title
            self.known[ordinal] = True
            self.items[ordinal] = item
            self.authors[ordinal] = vocabulary.author_token(item.author)
            tokens = vocabulary.category_tokens(item.categories)
            self.categories[ordinal, : len(tokens)] = tokens
            # Newest first by publication; an item without one counts from its upsert.
            self.times[ordinal] = item.published_at if item.published_at is not None else entry.upserted_at
            self.upserted_at[ordinal] = entry.upserted_at
            self.index_of[item.item_id] = n_items + ordinal
            if item.item_id in state.withdrawn:
                withdrawn_new.append(n_items + ordinal)
        for item_id in state.withdrawn:
            own = item_lookup.get(item_id)
            if own is not None:
                withdrawn_own.append(own)
        self.withdrawn = np.unique(np.asarray(withdrawn_own + withdrawn_new, dtype=np.int32))
        servable = np.flatnonzero(self.known).astype(np.int32) + np.int32(n_items)
        servable = servable[~np.isin(servable, self.withdrawn)]
        order = np.argsort(-self.times[servable - n_items], kind="stable")
        self.servable: IntArray = servable[order]  # dense indexes, newest first
        self.servable_times: FloatArray = self.times[self.servable - n_items].astype(np.float32)
        self.built_at = now
        # Recall's, set by its `prepare` off the request path: index → exposure digest over the
        # version's items and these, and the new_items channel's source.
        self.exposure_digests: npt.NDArray[np.uint64] | None = None
        self.source: NewItemSource | None = None
        # The servable items embedded by the version's item tower and their small ANN index,
        # which the two_tower channel searches beside the version's (None: not embedded).
        self.two_tower_source: CandidateSource | None = None

    def servable_items(self) -> list[CatalogueItem]:
        """The servable items' metadata, aligned with `servable`."""
        items = []
        for index in self.servable.tolist():
            item = self.items[index - self.base]
            assert item is not None  # a servable ordinal holds an item
            items.append(item)
        return items

    def new_item_source(
        self, version_categories: npt.NDArray[Any], clock: Callable[[], float] = time.time
    ) -> NewItemSource:
        """The new_items channel over the servable items (`version_categories`: the version's
        `Catalogue.categories`, to read a user's engaged categories; `clock`: what items'
        ages are measured from)."""
        ordinals = self.servable - self.base
        return NewItemSource(
            self.servable,
            self.times[ordinals],
            self.authors[ordinals],
            self.categories[ordinals],
            version_categories,
            clock,
        )

    def __len__(self) -> int:
        return int(self.servable.shape[0])

    @property
    def empty(self) -> bool:
        """Nothing to serve and nothing withdrawn: the version serves as if no catalogue existed."""
        return len(self) == 0 and self.withdrawn.shape[0] == 0

    def index(self, item_id: str) -> int | None:
        """An external id's dense index in this version: its own, else the new item's."""
        own = self._item_lookup.get(item_id)
        return own if own is not None else self.index_of.get(item_id)

    def is_new(self, indexes: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """Which indexes are new items this view knows (withdrawn ones included)."""
        ordinals = np.asarray(indexes, dtype=np.int64) - self.base
        inside = (ordinals >= 0) & (ordinals < self.known.shape[0])
        if not inside.any():
            return inside
        return np.asarray(inside & self.known[np.where(inside, ordinals, 0)])

    def upserted_within(self, indexes: npt.NDArray[Any], seconds: float, now: float) -> npt.NDArray[np.bool_]:
        """Which indexes are new items this view knows upserted less than `seconds` before
        `now` (what a scene's new-item traffic control calls new)."""
        new = self.is_new(indexes)
        if not new.any():
            return new
        ordinals = np.asarray(indexes, dtype=np.int64)[new] - self.base
        young = new.copy()
        young[new] = now - self.upserted_at[ordinals] < seconds
        return young

    def servable_mask(self, indexes: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """Which indexes may be served: the version's own or a new item this view knows, and
        not withdrawn."""
        indexes = np.asarray(indexes, dtype=np.int64)
        known = (indexes >= 0) & (indexes < self.base) | self.is_new(indexes)
        if self.withdrawn.shape[0]:
            known &= ~np.isin(indexes, self.withdrawn)
        return np.asarray(known)

    def item_id(self, index: int) -> str:
        """The external id of a new item's index ("" when this view does not know it)."""
        ordinal = index - self.base
        return self.ids[ordinal] if 0 <= ordinal < len(self.ids) else ""

    def title(self, index: int) -> str:
        ordinal = index - self.base
        return self.titles[ordinal] if 0 <= ordinal < len(self.titles) else ""

    def gather(
        self, own: npt.NDArray[Any], extra: npt.NDArray[Any] | None, indexes: npt.NDArray[Any]
    ) -> npt.NDArray[Any]:
        """Rows of `own` (a version array by item) for the version's items, of `extra` (by
        ordinal; None: zeros) for new items, zeros for anything else."""
        indexes = np.asarray(indexes, dtype=np.int64)
        mine = (indexes >= 0) & (indexes < self.base)
        rows = np.zeros((indexes.shape[0], *own.shape[1:]), dtype=own.dtype)
        rows[mine] = own[indexes[mine]]
        new = self.is_new(indexes)
        if extra is not None and new.any():
            rows[new] = extra[indexes[new] - self.base]
        return rows

    def digests(self) -> npt.NDArray[np.uint64]:
        """The exposure-filter digests of new items, by ordinal (recall's `prepare` builds
        the version's digests followed by these into `exposure_digests`)."""
        from recsys.feature_store.bloom import item_digests

        return item_digests(self.ids) if self.ids else np.zeros(0, np.uint64)


Models = Callable[[], Sequence[tuple[str, Any]]]  # (version, ServingModel) of the servable versions


class CatalogueWatcher(Poller):
    """Polls the feature store's catalogue revision every `poll_seconds` and, when it moved
    (or a version without a view appears), reads the catalogue and lays it out for every
    servable version in a thread. Requests read `view(version)`: a dict lookup, None while
    the catalogue is empty, so a store with no upserted items costs requests nothing.

    A feature store that does not answer keeps the last views (and says so in the log): new
    items stay served, and a withdrawal made meanwhile takes effect at the first good poll.

    With `impressions_horizon` (the gateway's: seconds, the longest `max_age` of the scenes
    with new-item traffic on, 0 when none is), each poll also reads the impression counts of
    the items upserted within it (one HMGET), so that requests read them from memory
    (`impressions`) and the boost costs no round trip. A failed read keeps the last counts."""

    def __init__(
        self,
        features: FeatureStore,
        models: Models,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        *,
        prepare: Callable[[Any, NewItems], None] | None = None,
        on_poll: Callable[[CatalogueWatcher, bool], None] | None = None,
        impressions_horizon: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(poll_seconds, name="catalogue-watcher", log=log, what="polling the live catalogue")
        self._features = features
        self._models = models
        self._prepare = prepare  # per service: what its requests need built up front (digests)
        self._on_poll = on_poll  # after each poll, whether it succeeded (the service's metrics)
        self._impressions_horizon = impressions_horizon
        self._impressions = np.zeros(0, np.int64)  # by ordinal; 0 for items outside the horizon
        self._clock = clock
        self._state = CatalogueState.empty()
        self._views: dict[str, NewItems] = {}
        self._vocabularies: dict[str, VersionVocabulary] = {}
        self._upserted: frozenset[str] = frozenset()
        self._built_for: frozenset[str] = frozenset()  # the versions the views were built for

    @property
    def revision(self) -> int:
        return self._state.revision

    @property
    def items(self) -> tuple[StoredItem, ...]:
        return self._state.items

    def view(self, version: str) -> NewItems | None:
        """The version's live catalogue, or None when there is nothing to serve or withdraw."""
        return self._views.get(version)

    def known_item(self, item_id: str, version: str) -> bool:
        """Whether `version` may serve `item_id` as a new item (upserted, not withdrawn)."""
        view = self._views.get(version)
        return view is not None and item_id in view.index_of and item_id not in self._state.withdrawn

    def withdrawn(self, item_id: str) -> bool:
        return item_id in self._state.withdrawn

    def upserted(self, item_id: str) -> bool:
        """Whether the catalogue (as last polled) holds the item, withdrawn or not."""
        return item_id in self._upserted

    def polled(self, succeeded: bool) -> None:
        if self._on_poll is not None:
            self._on_poll(self, succeeded)

    def impressions(self, ordinals: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """The impression counts of new items by ordinal, as last polled (0 when unknown)."""
        ordinals = np.asarray(ordinals, dtype=np.int64)
        counts = self._impressions
        inside = (ordinals >= 0) & (ordinals < counts.shape[0])
        found = np.zeros(ordinals.shape, np.int64)
        found[inside] = counts[ordinals[inside]]
        return found

    async def poll(self) -> bool:
        """One poll: True when the views changed."""
        self.polls += 1
        changed = await self._poll_catalogue()
        if self._impressions_horizon is not None:
            await self._poll_impressions(self._impressions_horizon())
        return changed

    async def _poll_impressions(self, horizon: float) -> None:
        state = self._state
        if horizon <= 0 or not state.items:
            if self._impressions.shape[0]:
                self._impressions = np.zeros(0, np.int64)
            return
        oldest = self._clock() - horizon
        young = [
            entry
            for entry in state.items
            if entry.upserted_at > oldest and entry.item.item_id not in state.withdrawn
        ]
        counts = await self._features.item_impressions([entry.item.item_id for entry in young])
        impressions = np.zeros(state.items[-1].ordinal + 1, np.int64)
        impressions[[entry.ordinal for entry in young]] = counts
        self._impressions = impressions

    async def _poll_catalogue(self) -> bool:
        revision = await self._features.catalogue_revision()
        models = list(self._models())
        names = frozenset(version for version, _ in models)
        if revision == self._state.revision and (revision == 0 or names == self._built_for):
            return False
        state = self._state if revision == self._state.revision else await self._features.catalogue_state()
        views = await asyncio.to_thread(self._build, state, models)
        self._state, self._views, self._built_for = state, views, names
        self._upserted = frozenset(entry.item.item_id for entry in state.items)
        return True

    def _build(self, state: CatalogueState, models: Sequence[tuple[str, Any]]) -> dict[str, NewItems]:
        views: dict[str, NewItems] = {}
        self._vocabularies = {
            version: vocabulary
            for version, vocabulary in self._vocabularies.items()
            if version in {name for name, _ in models}
        }
        if state.revision == 0:
            return views
        now = self._clock()
        for version, model in models:
            existing = self._views.get(version)
            if existing is not None and existing.revision == state.revision:
                views[version] = existing
                continue
            catalogue = model.core.catalogue
            vocabulary = self._vocabularies.get(version)
            if vocabulary is None:
                vocabulary = self._vocabularies[version] = VersionVocabulary.of(catalogue)
            view = NewItems(
                version, state.revision, catalogue.n_items, model.item_lookup, vocabulary, state, now
            )
            if view.empty:
                continue
            if self._prepare is not None:
                self._prepare(model, view)
            views[version] = view
        return views
