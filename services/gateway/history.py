"""A user's recent history as the serving path sees it, for the demo page
(`GET /v1/users/{id}/history`, off unless `http_ui` is set): the model version's snapshot of
the user, then their live events, newest first, each with the catalogue's title.

It reads what recall hydrates a user from (`FeatureStore.user_state`: one Redis round trip),
so the page shows exactly the history the next answer is computed from, clicks included the
moment they are reported. No gRPC or HTTP types here (see http.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from recsys.errors import InvalidArgument
from recsys.feature_store import FeatureStore
from recsys.feature_store.snapshot_loss import with_version_snapshot
from recsys.limits import ID_CHARS
from recsys.serving_model import ServingModel
from services.common.versions import ModelVersions

SNAPSHOT_KIND = "history"
"""The kind of a snapshot entry: an interaction of the version's training data."""


@dataclass(frozen=True)
class HistoryEntry:
    item_id: str
    title: str  # "" when the catalogue has none, or the item is not in the served version
    kind: str  # a live event's kind (click, like, rating, consume, impression) or SNAPSHOT_KIND
    time: float | None  # unix seconds; None when the data has no time
    rating: float | None  # a rating's value; None for other kinds and unrated interactions
    live: bool  # a reported event (True) or the version's training data (False)


@dataclass(frozen=True)
class UserHistoryView:
    user_id: str
    model_version: str
    known_user: bool  # in the served version's users
    entries: list[HistoryEntry]  # newest first, at most the limit asked for
    more: bool  # older entries exist beyond the limit
    degraded: list[str]  # "feature_snapshot_missing": the version's own data stood in


class UserHistoryHydrator:
    """Reads one user's history on the current model version, bounded by `max_entries`."""

    identifier = "user_history"

    def __init__(
        self, versions: ModelVersions[ServingModel], features: FeatureStore, max_entries: int
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries: expected at least 1, got {max_entries}")
        self._versions = versions
        self._features = features
        self.max_entries = max_entries

    def validate(self, user_id: str, limit: int) -> None:
        """InvalidArgument naming `user_id` or `limit` when out of bounds (the limits of every
        other endpoint's user id)."""
        if not user_id:
            raise InvalidArgument("user_id", "must not be empty")
        if len(user_id) > ID_CHARS:
            raise InvalidArgument("user_id", f"at most {ID_CHARS} characters, got {len(user_id)}")
        if not 1 <= limit <= self.max_entries:
            raise InvalidArgument("limit", f"must be in [1, {self.max_entries}], got {limit}")

    async def read(self, user_id: str, limit: int) -> UserHistoryView:
        """`validate`'s InvalidArgument; FeatureStoreUnavailable when the store does not answer."""
        self.validate(user_id, limit)
        loaded = self._versions.get()
        model = loaded.model
        user_index = model.user_lookup.get(user_id, -1)
        # One more live event than shown tells whether older ones exist.
        state = await self._features.user_state(
            loaded.version, user_id, now=time.time(), live_limit=limit + 1
        )
        degraded: list[str] = []
        if len(state.snapshot) == 0 and user_index >= 0 and model.core.history.items.row(user_index).size:
            # push-features writes every user with a history: an empty snapshot of one means
            # the version's features are gone from the store (as recall finds and flags too);
            # the version's own data is what it held.
            state = with_version_snapshot(state, model.core, user_index)
            degraded.append("feature_snapshot_missing")
        catalogue, lookup = model.core.catalogue, model.item_lookup

        def title(index: int) -> str:
            return str(catalogue.titles[index]) if 0 <= index < catalogue.n_items else ""

        live = state.live_events[-limit:]  # oldest → newest
        entries = [
            HistoryEntry(
                item_id=event.item_id,
                title=title(lookup.get(event.item_id, -1)),
                kind=event.kind,
                time=event.time,
                rating=event.value if event.kind == "rating" and math.isfinite(event.value) else None,
                live=True,
            )
            for event in reversed(live)
        ]
        snapshot = state.snapshot
        room = limit - len(entries)
        if room > 0 and len(snapshot):
            start = max(0, len(snapshot) - room)
            items = snapshot.items[start:].tolist()
            times = snapshot.times[start:].tolist()
            ratings = snapshot.ratings[start:].tolist()
            for item, when, rating in zip(reversed(items), reversed(times), reversed(ratings), strict=True):
                entries.append(
                    HistoryEntry(
                        item_id=str(catalogue.item_ids[item]) if 0 <= item < catalogue.n_items else "",
                        title=title(item),
                        kind=SNAPSHOT_KIND,
                        time=float(when) if when > 0 else None,
                        rating=float(rating) if math.isfinite(rating) else None,
                        live=False,
                    )
                )
        more = len(state.live_events) + len(snapshot) > len(entries)
        return UserHistoryView(user_id, loaded.version, user_index >= 0, entries, more, degraded)
