"""MovieLens 100K (GroupLens) → `RawData`.

Files under `<data_dir>/ml-100k/`: `u.data` (tab: user, item, rating 1–5, unix time), `u.user`
(`|`: id, age, gender, occupation, zip), `u.item` (`|`, Latin-1: id, title, release date,
video release date, IMDb url, 19 genre flags) and `u.genre` (the flags' names). No authors.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from training.data.paths import describe_files, relative_name
from training.data.raw import (
    LoadReport,
    RawData,
    clean_strings,
    complete_items,
    complete_users,
    drop_duplicate_ids,
    drop_duplicate_interactions,
    interactions_frame,
    items_frame,
    users_frame,
)

NAME: Final = "ml-100k"
LIKE_THRESHOLD: Final = 4.0
OTHER_REGION: Final = "other"
_ITEM_FIXED_COLUMNS: Final = ("item_id", "title", "release_date", "video_release_date", "url")


def load_movielens_100k(data_dir: Path) -> RawData:
    """Load `<data_dir>/ml-100k`. Region is the first digit of the US zip code (the postal
    zone), "other" for non-US codes; item_time is the release year; categories are the genres
    (without "unknown")."""
    folder = data_dir / NAME
    files = {name: folder / name for name in ("u.data", "u.user", "u.item", "u.genre")}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{NAME}: missing {path} (is --data-dir right?)")
    report = LoadReport()

    def read(name: str, names: list[str], separator: str, encoding: str = "utf-8") -> pd.DataFrame:
        frame = pd.read_csv(
            files[name],
            sep=separator,
            header=None,
            names=names,
            dtype=str,
            keep_default_na=False,
            encoding=encoding,
            quoting=csv.QUOTE_NONE,  # quotes in titles are part of the title
        )
        report.rows_read[relative_name(files[name], data_dir)] = len(frame)
        return frame

    ratings = read("u.data", ["user_id", "item_id", "rating", "timestamp"], "\t")
    interactions = _interactions(ratings, report)

    genre_table = pd.read_csv(files["u.genre"], sep="|", header=None, names=["name", "index"], dtype=str)
    genres = genre_table.sort_values("index", key=lambda index: index.astype(int))["name"].tolist()
    item_table = read("u.item", [*_ITEM_FIXED_COLUMNS, *genres], "|", encoding="latin-1")
    items = _items(item_table, genres, report)

    user_table = read("u.user", ["user_id", "age", "gender", "occupation", "zip"], "|")
    users = users_frame(clean_strings(user_table["user_id"]), _zip_regions(user_table["zip"]))

    interactions = drop_duplicate_interactions(interactions, report)
    items = complete_items(items, interactions, report)
    users = complete_users(users, interactions, report)
    return RawData(
        name=NAME,
        interactions=interactions,
        items=items,
        users=users,
        like_threshold=LIKE_THRESHOLD,
        has_rating=True,
        has_time=True,
        has_authors=False,
        has_categories=True,
        has_regions=True,
        report=report,
        source={
            "dataset": NAME,
            "files": describe_files(files.values(), data_dir),
            "parameters": {"like_threshold": LIKE_THRESHOLD},
        },
    )


def _interactions(ratings: pd.DataFrame, report: LoadReport) -> pd.DataFrame:
    user_id = clean_strings(ratings["user_id"])
    item_id = clean_strings(ratings["item_id"])
    rating = pd.to_numeric(ratings["rating"], errors="coerce")
    timestamp = pd.to_numeric(ratings["timestamp"], errors="coerce")
    missing_id = user_id.isna() | item_id.isna()
    report.drop("interactions: missing user or item id", int(missing_id.sum()))
    bad_rating = ~missing_id & ~rating.between(1, 5)
    report.drop("interactions: rating missing or outside 1–5", int(bad_rating.sum()))
    bad_time = ~missing_id & ~bad_rating & timestamp.isna()
    report.drop("interactions: missing or unparseable time", int(bad_time.sum()))
    keep = (~(missing_id | bad_rating | bad_time)).to_numpy()
    return interactions_frame(
        user_id[keep], item_id[keep], rating[keep], timestamp[keep].to_numpy().astype(np.int64)
    )


def _items(table: pd.DataFrame, genres: list[str], report: LoadReport) -> pd.DataFrame:
    item_id = clean_strings(table["item_id"])
    report.drop("items: missing item id", int(item_id.isna().sum()))
    table = table[item_id.notna().to_numpy()]
    item_id = item_id[item_id.notna()]
    # The file's placeholder row (id 267) is titled "unknown": an unknown title is "".
    titles = table["title"].str.strip().replace("unknown", "")
    named_genres = [genre for genre in genres if genre != "unknown"]
    flags = table[named_genres].apply(pd.to_numeric, errors="coerce").fillna(0).to_numpy() > 0
    names = np.array(named_genres, dtype=object)
    categories = [names[row].tolist() for row in flags]
    # Release dates look like "01-Jan-1995"; the year is what survives as item_time.
    years = pd.to_numeric(table["release_date"].str.strip().str[-4:], errors="coerce")
    items = items_frame(item_id, title=titles, categories=categories, item_time=years)
    return drop_duplicate_ids(items, "item_id", report)


def _zip_regions(zip_codes: pd.Series) -> pd.Series:
    """US zip codes start with a digit naming the postal zone (0 = north east … 9 = west coast);
    Canadian and other codes are grouped as "other"."""
    first = zip_codes.astype("str").str.strip().str[:1]
    return first.where(first.str.isdigit().fillna(False).astype(bool), OTHER_REGION)
