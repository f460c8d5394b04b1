"""The item cold-start set of a data set, as `recsys.evaluation.cold_start` reads it.

Book-Crossing ships one: `BX-NewBooks.csv` (books no build trains on) and their ratings. The
books become `CatalogueItem`s exactly as an operator's `recsys catalogue add` would give them
(title, author, publisher as a `publisher:` category and the publisher, the publication year as
its 1 January), so the evaluation sees only what serving sees of a new item.
"""

from __future__ import annotations

import calendar
import math
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.evaluation.cold_start import ColdStartSet
from recsys.feature_store import MAX_CATEGORIES, CatalogueItem
from training.data.book_crossing import PUBLISHER_PREFIX, load_book_crossing_new_books


def catalogue_items(items: pd.DataFrame) -> tuple[CatalogueItem, ...]:
    """Canonical items frame rows (`training.data.raw.items_frame`) → catalogue items."""
    result: list[CatalogueItem] = []
    for item_id, title, categories, author, year in zip(
        items["item_id"],
        items["title"],
        items["categories"],
        items["author"],
        items["item_time"],
        strict=True,
    ):
        names = tuple(str(name) for name in categories)[:MAX_CATEGORIES]
        publisher = next(
            (name[len(PUBLISHER_PREFIX) :] for name in names if name.startswith(PUBLISHER_PREFIX)), ""
        )
        published = None
        if year is not None and not math.isnan(float(year)):
            published = float(calendar.timegm((int(year), 1, 1, 0, 0, 0)))
        result.append(
            CatalogueItem(
                str(item_id),
                title=str(title),
                author="" if author is None or pd.isna(author) else str(author),
                categories=names,
                publisher=publisher,
                published_at=published,
            )
        )
    return tuple(result)


def book_crossing_cold_start(data_dir: Path) -> ColdStartSet:
    """The NewBooks set: every new book and every rating of one."""
    items, interactions = load_book_crossing_new_books(data_dir)
    catalogue = catalogue_items(items)
    position = {item.item_id: index for index, item in enumerate(catalogue)}
    rated = interactions[interactions["item_id"].isin(position)]
    return ColdStartSet(
        catalogue,
        tuple(str(user) for user in rated["user_id"]),
        np.asarray([position[item] for item in rated["item_id"]], dtype=np.int32),
    )
