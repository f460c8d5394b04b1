"""The one shape every data set is loaded into (`RawData`), and the cleaning steps the loaders share.

A loader reads its files, puts them into the canonical frames with the helpers below (which
fix the dtypes, resolve duplicate interactions and give every interacted item and user a
metadata row) and records what it dropped or assumed in a `LoadReport`. Everything after
loading (vocabularies, splits, training) sees only `RawData`, never a file format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import pandas as pd

INTERACTION_COLUMNS: Final = ("user_id", "item_id", "rating", "timestamp")
ITEM_COLUMNS: Final = ("item_id", "title", "categories", "author", "item_time", "publisher")
USER_COLUMNS: Final = ("user_id", "region")

# Values that mean "missing" in real files, compared after stripping and lower-casing.
MISSING_TOKENS: Final = frozenset({"", "na", "n/a", "n.a.", "n.a", "nan", "null", "none", "\\n"})
# Stripped from both ends of every text value: spaces and stray quotes.
STRIP_CHARACTERS: Final = " \t\r\n\"'"


@dataclass
class LoadReport:
    """What a loader read, dropped and assumed: printed by the CLI and kept in the store's manifest."""

    rows_read: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, count: int) -> None:
        """Count `count` rows dropped for `reason` (nothing is recorded for zero)."""
        if count > 0:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(count)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def summary_lines(self) -> list[str]:
        lines = [f"read {_rows(count)} from {name}" for name, count in self.rows_read.items()]
        lines += [f"dropped {_rows(count)}: {reason}" for reason, count in self.dropped.items()]
        lines += list(self.notes)
        return lines


def _rows(count: int) -> str:
    return f"{count:,} row" if count == 1 else f"{count:,} rows"


@dataclass
class RawData:
    """A data set in the canonical shape.

    - `interactions`: user_id, item_id (both str, or both int64), rating (float32; all NaN when
      `has_rating` is False), timestamp (int64 unix seconds; only when `has_time`). One row per
      (user_id, item_id): the latest by time, else the last row in the file.
    - `items`: item_id, title (str, "" if unknown), categories (list[str]), author (str or None),
      item_time (float64 year or unix time, NaN if unknown), publisher (str or None). One row
      per item, including every interacted item and items never interacted with.
    - `users`: user_id, region (str or None). One row per user, as for items.

    A rating >= `like_threshold` is a like; with no rating (None) every interaction is one.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    like_threshold: float | None
    has_rating: bool
    has_time: bool
    has_authors: bool
    has_categories: bool
    has_regions: bool
    report: LoadReport
    source: dict[str, Any]

    def __post_init__(self) -> None:
        _check_shape(self)

    @property
    def capabilities(self) -> dict[str, bool]:
        return {
            "rating": self.has_rating,
            "time": self.has_time,
            "authors": self.has_authors,
            "categories": self.has_categories,
            "regions": self.has_regions,
        }


def _check_shape(data: RawData) -> None:
    """Cheap structural checks (columns, dtypes, flags agreeing with the data): O(rows), no sorting."""
    expected = [c for c in INTERACTION_COLUMNS if c != "timestamp" or data.has_time]
    if list(data.interactions.columns) != expected:
        raise ValueError(f"interactions: expected columns {expected}, got {list(data.interactions.columns)}")
    if list(data.items.columns) != list(ITEM_COLUMNS):
        raise ValueError(f"items: expected columns {list(ITEM_COLUMNS)}, got {list(data.items.columns)}")
    if list(data.users.columns) != list(USER_COLUMNS):
        raise ValueError(f"users: expected columns {list(USER_COLUMNS)}, got {list(data.users.columns)}")
    interactions = data.interactions
    ids = (interactions["user_id"], interactions["item_id"])
    both_int = all(column.dtype == np.int64 for column in ids)
    if not both_int and not all(pd.api.types.is_string_dtype(column) for column in ids):
        dtypes = [str(column.dtype) for column in ids]
        raise ValueError(f"interactions: user_id and item_id must both be str or both int64, got {dtypes}")
    if interactions["rating"].dtype != np.float32:
        raise ValueError(f"interactions: rating must be float32, got {interactions['rating'].dtype}")
    if data.has_time and interactions["timestamp"].dtype != np.int64:
        raise ValueError(f"interactions: timestamp must be int64, got {interactions['timestamp'].dtype}")
    if data.has_rating != (data.like_threshold is not None):
        raise ValueError(
            f"like_threshold: {data.like_threshold} does not agree with has_rating={data.has_rating}"
        )
    rating_missing = interactions["rating"].isna()
    if data.has_rating and rating_missing.any():
        raise ValueError("interactions: rating has missing values although has_rating is True")
    if not data.has_rating and not rating_missing.all():
        raise ValueError("interactions: rating must be all NaN when has_rating is False")
    if data.items["item_time"].dtype != np.float64:
        raise ValueError(f"items: item_time must be float64, got {data.items['item_time'].dtype}")


# --- cleaning helpers shared by the loaders ---------------------------------------------------


def clean_strings(values: pd.Series, strip: str = STRIP_CHARACTERS) -> pd.Series:
    """Text values with spaces and stray quotes stripped; empty and missing tokens become NaN."""

    def clean(text: pd.Series) -> pd.Series:
        text = text.str.strip(strip)
        return text.mask(text.str.lower().isin(MISSING_TOKENS))

    return _per_distinct_value(values, clean)


def clean_text(values: pd.Series) -> pd.Series:
    """Free text (titles, names, places): spaces stripped, one pair of enclosing double quotes
    removed, then a lone unbalanced quote at either end (`' usa"'` → `usa`); quotes that belong
    to the text (`Café "Noir"`) stay. Empty and missing tokens become NaN."""

    def clean(text: pd.Series) -> pd.Series:
        text = text.str.strip()
        enclosed = (text.str.len() >= 2) & text.str.startswith('"') & text.str.endswith('"')
        text = text.where(~enclosed.fillna(False).astype(bool), text.str[1:-1]).str.strip()
        unbalanced = (text.str.count('"') % 2 == 1).fillna(False).astype(bool)
        trailing = unbalanced & text.str.endswith('"').fillna(False).astype(bool)
        leading = unbalanced & ~trailing & text.str.startswith('"').fillna(False).astype(bool)
        text = text.where(~trailing, text.str[:-1]).where(~leading, text.str[1:]).str.strip()
        return text.mask(text.str.lower().isin(MISSING_TOKENS))

    return _per_distinct_value(values, clean)


def _per_distinct_value(values: pd.Series, clean: Callable[[pd.Series], pd.Series]) -> pd.Series:
    """`clean` applied to each distinct value once (string methods run in Python per value, and
    id columns repeat each value many times), mapped back onto `values` (str dtype, same index)."""
    codes, distinct = pd.factorize(values.astype("str"))
    cleaned = clean(pd.Series(distinct, dtype="str")).to_numpy(dtype=object, na_value=np.nan)
    lookup = np.append(cleaned, np.nan)  # code -1 (missing) → NaN
    return pd.Series(lookup[codes], index=values.index, dtype="str")


def as_object(values: pd.Series) -> pd.Series:
    """A text column as object dtype with None for missing (the form `author` and `region` use)."""
    result = values.astype(object)
    return result.where(values.notna(), None)


def interactions_frame(
    user_id: Any, item_id: Any, rating: Any | None, timestamp: Any | None, *, ids_as_str: bool = True
) -> pd.DataFrame:
    """The canonical interactions frame; `rating=None` gives an all-NaN column (no rating),
    `timestamp=None` no timestamp column."""
    users = _ids(user_id, ids_as_str)
    columns: dict[str, Any] = {"user_id": users, "item_id": _ids(item_id, ids_as_str)}
    columns["rating"] = (
        np.full(len(users), np.nan, dtype=np.float32) if rating is None else np.asarray(rating, np.float32)
    )
    if timestamp is not None:
        columns["timestamp"] = np.asarray(timestamp, dtype=np.int64)
    return pd.DataFrame(columns)


def items_frame(
    item_id: Any,
    *,
    title: Any | None = None,
    categories: Sequence[list[str]] | None = None,
    author: Any | None = None,
    item_time: Any | None = None,
    publisher: Any | None = None,
    ids_as_str: bool = True,
) -> pd.DataFrame:
    """The canonical items frame; a metadata argument left as None gives the empty value for
    every item ("" title, [] categories, None author, NaN item_time, None publisher)."""
    ids = _ids(item_id, ids_as_str)
    length = len(ids)
    titles = _texts([""] * length if title is None else title).fillna("")
    category_lists = [[] for _ in range(length)] if categories is None else list(categories)
    return pd.DataFrame(
        {
            "item_id": ids,
            "title": titles,
            "categories": pd.Series(category_lists, dtype=object),
            "author": _optional_texts(author, length),
            "item_time": (
                np.full(length, np.nan) if item_time is None else np.asarray(item_time, dtype=np.float64)
            ),
            "publisher": _optional_texts(publisher, length),
        }
    )


def users_frame(user_id: Any, region: Any | None = None, *, ids_as_str: bool = True) -> pd.DataFrame:
    """The canonical users frame; `region=None` gives None for every user."""
    ids = _ids(user_id, ids_as_str)
    return pd.DataFrame({"user_id": ids, "region": _optional_texts(region, len(ids))})


def _ids(values: Any, as_str: bool) -> pd.Series:
    series = pd.Series(values).reset_index(drop=True)
    return series.astype("str") if as_str else series.astype(np.int64)


def _texts(values: Any) -> pd.Series:
    return pd.Series(values).reset_index(drop=True).astype("str")


def _optional_texts(values: Any | None, length: int) -> pd.Series:
    if values is None:
        return pd.Series([None] * length, dtype=object)
    return as_object(pd.Series(values).reset_index(drop=True))


def drop_duplicate_interactions(
    interactions: pd.DataFrame, report: LoadReport, label: str = "interactions"
) -> pd.DataFrame:
    """One row per (user_id, item_id): the latest by timestamp (ties: the later row), or the last
    row when there is no time. The kept rows stay in file order."""
    has_time = "timestamp" in interactions.columns
    ordered = interactions.reset_index(drop=True)
    if has_time:
        ordered = ordered.sort_values("timestamp", kind="stable")
    duplicated = ordered.duplicated(["user_id", "item_id"], keep="last")
    kept = "latest" if has_time else "last"
    report.drop(f"{label}: duplicate (user, item), kept {kept}", int(duplicated.sum()))
    return ordered[~duplicated.to_numpy()].sort_index().reset_index(drop=True)


def drop_duplicate_ids(
    frame: pd.DataFrame, id_column: str, report: LoadReport, reason: str | None = None
) -> pd.DataFrame:
    """One metadata row per id, the last one in the file; the dropped rows are counted under
    `reason` (default "<items|users>: duplicate <id_column>, kept last")."""
    duplicated = frame.duplicated([id_column], keep="last")
    label = "items" if id_column == "item_id" else "users"
    report.drop(reason or f"{label}: duplicate {id_column}, kept last", int(duplicated.sum()))
    return frame[~duplicated.to_numpy()].reset_index(drop=True)


def complete_items(
    items: pd.DataFrame, interactions: pd.DataFrame, report: LoadReport, label: str = "items"
) -> pd.DataFrame:
    """Append an empty-metadata row for each interacted item the metadata does not know."""
    missing = _unknown_ids(interactions["item_id"], items["item_id"])
    if len(missing) == 0:
        return items.reset_index(drop=True)
    report.note(
        f"{label}: {_ids_count(len(missing), 'item')} seen only in interactions (kept with empty metadata)"
    )
    extra = items_frame(missing, ids_as_str=interactions["item_id"].dtype != np.int64)
    return pd.concat([items, extra], ignore_index=True)


def complete_users(
    users: pd.DataFrame, interactions: pd.DataFrame, report: LoadReport, label: str = "users"
) -> pd.DataFrame:
    """Append a row (region None) for each interacting user the metadata does not know."""
    missing = _unknown_ids(interactions["user_id"], users["user_id"])
    if len(missing) == 0:
        return users.reset_index(drop=True)
    report.note(
        f"{label}: {_ids_count(len(missing), 'user')} seen only in interactions (kept with no region)"
    )
    extra = users_frame(missing, ids_as_str=interactions["user_id"].dtype != np.int64)
    return pd.concat([users, extra], ignore_index=True)


def _ids_count(count: int, kind: str) -> str:
    return f"{count:,} {kind} id" if count == 1 else f"{count:,} {kind} ids"


def _unknown_ids(seen: pd.Series, known: pd.Series) -> pd.Series:
    distinct = pd.Series(pd.unique(seen), dtype=seen.dtype)
    return distinct[~distinct.isin(known)].reset_index(drop=True)
