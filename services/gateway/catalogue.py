"""UpsertItems and WithdrawItems: the live catalogue's writes. No gRPC here (see servicer.py).

Why the gateway owns them: it is the one service with caller authentication (API keys, JWTs,
client certificates), per-caller rate limits and the HTTP/gRPC edge operators already reach;
recall and rank are reached only by the gateway and authenticate no one. The writes go to
the feature store every service already shares, and recall, rank and the gateway each pick
the change up at their next catalogue poll (`recsys.catalogue.CatalogueWatcher`), so no
service calls another for it and a fourth deployment would only add a hop. The calls are
internal all the same: they need the `recsys:catalogue` scope (`CATALOGUE_SCOPE`) when
authentication is on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from recsys.errors import InvalidArgument
from recsys.feature_store import MAX_CATEGORIES, CatalogueItem, FeatureStore
from recsys.limits import CREDIT_CHARS, ID_CHARS, NAME_CHARS, TITLE_CHARS
from services.common.auth import CATALOGUE_SCOPE, authorize_scope

DEFAULT_MAX_ITEMS = 1000


@dataclass(frozen=True)
class UpsertOutcome:
    added: int
    updated: int


@dataclass(frozen=True)
class WithdrawOutcome:
    withdrawn: int
    already_withdrawn: int
    unknown: int


def check_item(item: CatalogueItem, path: str) -> None:
    """The limits of `recsys.v1.CatalogueItem` (the proto edge checks them too; this keeps
    the engine safe for any caller)."""
    for name, most in (("item_id", ID_CHARS), ("title", TITLE_CHARS), ("author", CREDIT_CHARS)):
        length = len(getattr(item, name))
        if length > most:
            raise InvalidArgument(f"{path}.{name}", f"at most {most} characters, got {length}")
    if len(item.publisher) > CREDIT_CHARS:
        length = len(item.publisher)
        raise InvalidArgument(f"{path}.publisher", f"at most {CREDIT_CHARS} characters, got {length}")
    if not item.item_id.strip():
        raise InvalidArgument(f"{path}.item_id", "must not be empty")
    if len(item.categories) > MAX_CATEGORIES:
        count = len(item.categories)
        raise InvalidArgument(f"{path}.categories", f"at most {MAX_CATEGORIES} entries, got {count}")
    for position, category in enumerate(item.categories):
        if not category.strip():
            raise InvalidArgument(f"{path}.categories[{position}]", "must not be empty")
        if len(category) > NAME_CHARS:
            raise InvalidArgument(
                f"{path}.categories[{position}]", f"at most {NAME_CHARS} characters, got {len(category)}"
            )
    if item.published_at is not None and item.published_at < 0:
        raise InvalidArgument(f"{path}.published_at", "must not be before 1970")


class CatalogueEditor:
    """Validates a whole call before writing any of it (a call is applied all or nothing),
    then writes it in one feature-store step."""

    def __init__(
        self,
        features: FeatureStore,
        known_item: Callable[[str], bool],
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items: expected at least 1, got {max_items}")
        self._features = features
        self._known_item = known_item  # in the current version or upserted (as last polled)
        self.max_items = max_items
        self._clock = clock

    def _check_batch(self, size: int, field: str) -> None:
        if size == 0:
            raise InvalidArgument(field, "must not be empty")
        if size > self.max_items:
            raise InvalidArgument(field, f"at most {self.max_items} per call, got {size}")

    async def upsert(self, items: Sequence[CatalogueItem]) -> UpsertOutcome:
        authorize_scope(CATALOGUE_SCOPE, "UpsertItems")
        self._check_batch(len(items), "items")
        for index, item in enumerate(items):
            check_item(item, f"items[{index}]")
        # The last one wins for an id given twice, as two calls in a row would have it.
        latest = {item.item_id: item for item in items}
        outcomes = await self._features.upsert_items(list(latest.values()), self._clock())
        added = sum(1 for _, new in outcomes if new)
        return UpsertOutcome(added, len(outcomes) - added)

    async def withdraw(self, item_ids: Sequence[str]) -> WithdrawOutcome:
        authorize_scope(CATALOGUE_SCOPE, "WithdrawItems")
        self._check_batch(len(item_ids), "item_ids")
        for index, item_id in enumerate(item_ids):
            if not item_id.strip():
                raise InvalidArgument(f"item_ids[{index}]", "must not be empty")
            if len(item_id) > ID_CHARS:
                length = len(item_id)
                raise InvalidArgument(f"item_ids[{index}]", f"at most {ID_CHARS} characters, got {length}")
        unique = list(dict.fromkeys(item_ids))
        fresh = await self._features.withdraw_items(unique, self._clock())
        withdrawn = sum(fresh)
        unknown = sum(1 for item_id in unique if not self._known_item(item_id))
        return WithdrawOutcome(withdrawn, len(unique) - withdrawn, unknown)
