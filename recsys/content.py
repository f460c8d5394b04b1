"""An item's content as the item tower reads it: the one place (TF-free) that turns metadata
into the tower's content inputs, for the build (every item of the version) and for serving
(items upserted while serving, `recsys.catalogue.NewItems`), so both sides make the same
tokens.

- `publisher`: the publisher's name, normalised and hashed into `n_publisher_buckets`;
- `publication_year`: the year (from a year or from unix seconds) in 2-year buckets;
- `title_tokens`: the title's words (lower case, stop words and numbers dropped, first
  `max_title_tokens` distinct ones), each hashed into `n_title_buckets`, padded with 0.

Token 0 means absent everywhere (a data set without publishers, a title with no words, an
unknown year), so a data set that has none of these trains and serves with zeros. Hashing
is xxh64 of `salt:text`: the same in every process and on every machine (Python's `hash`
is salted per process), and an unseen publisher or word still gets a bucket.

`ContentEmbedder` (and `embed_items`, what the cold-start evaluation calls) embeds items a
version has never seen with its exported item tower: item token 0 and the metadata.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import xxhash

from recsys.ann import HnswIndex, MergedIndex
from recsys.artifacts import Catalogue, FloatArray, Int64Array
from recsys.catalogue import NewItems, VersionVocabulary
from recsys.errors import ModelOutputInvalid
from recsys.feature_store import CatalogueItem
from recsys.features import FeatureSpec, Inputs
from recsys.stages.sources import TwoTowerAnnSource

if TYPE_CHECKING:
    from recsys.onnx_models import OnnxModel
    from recsys.serving_model import ServingModel

PUBLISHER_SALT = "publisher"
TITLE_SALT = "title"
# Years in buckets of YEAR_WIDTH from YEAR_FIRST; earlier years share the first bucket and
# later ones the last. Token 0: unknown.
YEAR_FIRST = 1900
YEAR_LAST = 2039
YEAR_WIDTH = 2
N_YEAR_BUCKETS = 2 + (YEAR_LAST - YEAR_FIRST) // YEAR_WIDTH
# An item time above this (in absolute value) is unix seconds, below it a year: the loaders
# give years (MovieLens, Book-Crossing) or unix times (CSV), UpsertItems unix seconds.
UNIX_TIME_THRESHOLD = 10_000.0
# Words that say nothing about an item (MovieLens puts "The" last: "Usual Suspects, The").
STOP_WORDS = frozenset(
    {"a", "an", "and", "the", "of", "in", "on", "at", "to", "for", "with", "from", "by", "or"}
    # and the articles of titles in other languages
    | {"la", "le", "les", "el", "de", "des", "du", "der", "die", "das", "et"}
)
_WORDS = re.compile(r"\w+")
EMBED_BATCH = 8192


def normalise(text: str) -> str:
    """Case-folded, spaces collapsed: "  Penguin  Books" and "penguin books" are one publisher."""
    return " ".join(text.casefold().split())


def hash_bucket(text: str, n_buckets: int, salt: str) -> int:
    """A bucket in 1 … n_buckets − 1 for a non-empty text (0 for an empty one): stable across
    processes and machines."""
    if n_buckets < 2:
        raise ValueError(f"n_buckets: expected at least 2, got {n_buckets}")
    if not text:
        return 0
    return 1 + xxhash.xxh64_intdigest(f"{salt}:{text}".encode()) % (n_buckets - 1)


def title_words(title: str, limit: int) -> list[str]:
    """The first `limit` distinct words of a title, lower case, without stop words, numbers
    (MovieLens titles end in their year, which `publication_year` already gives) or single
    letters."""
    words: list[str] = []
    for word in _WORDS.findall(title.casefold()):
        if len(word) < 2 or word.isdigit() or word in STOP_WORDS or word in words:
            continue
        words.append(word)
        if len(words) == limit:
            break
    return words


def publication_year(value: float | None) -> int | None:
    """The year of an item time: a year as it is, unix seconds converted (UTC); None for an
    unknown (None, NaN) or implausible one."""
    if value is None or not math.isfinite(value):
        return None
    if abs(value) > UNIX_TIME_THRESHOLD:
        try:
            return datetime.datetime.fromtimestamp(value, datetime.UTC).year
        except (OverflowError, OSError, ValueError):
            return None
    year = int(value)
    return year if 1000 <= year <= 2999 else None


def year_bucket(year: int | None) -> int:
    if year is None:
        return 0
    clipped = min(max(year, YEAR_FIRST), YEAR_LAST)
    return 1 + (clipped - YEAR_FIRST) // YEAR_WIDTH


@dataclass(frozen=True)
class ContentTokens:
    """The content inputs of n items, aligned."""

    publisher: Int64Array  # [n]
    publication_year: Int64Array  # [n]
    title_tokens: Int64Array  # [n, max_title_tokens], 0 pads

    @classmethod
    def of(
        cls,
        spec: FeatureSpec,
        titles: Sequence[str],
        publishers: Sequence[str],
        times: Sequence[float | None] | npt.NDArray[Any],
    ) -> ContentTokens:
        """Tokens of items from their raw metadata (aligned sequences; "" and None/NaN are
        absent)."""
        n = len(titles)
        if len(publishers) != n or len(times) != n:
            raise ValueError(
                f"titles, publishers, times: lengths differ ({n}, {len(publishers)}, {len(times)})"
            )
        if not spec.has_content:
            raise ValueError("spec: this version's item tower has no content inputs")
        length = spec.max_title_tokens
        title_tokens = np.zeros((n, length), dtype=np.int64)
        for row, title in enumerate(titles):
            tokens = [
                hash_bucket(word, spec.n_title_buckets, TITLE_SALT) for word in title_words(title, length)
            ]
            title_tokens[row, : len(tokens)] = tokens
        publisher = np.array(
            [hash_bucket(normalise(name), spec.n_publisher_buckets, PUBLISHER_SALT) for name in publishers],
            dtype=np.int64,
        )
        years = np.array(
            [year_bucket(publication_year(None if value is None else float(value))) for value in times],
            dtype=np.int64,
        )
        return cls(publisher, years, title_tokens)

    def take(self, rows: npt.NDArray[Any]) -> ContentTokens:
        return ContentTokens(self.publisher[rows], self.publication_year[rows], self.title_tokens[rows])

    def inputs(self) -> Inputs:
        return {
            "publisher": self.publisher,
            "publication_year": self.publication_year,
            "title_tokens": self.title_tokens,
        }


class ContentEmbedder:
    """Embeds items a version has never seen with its exported item tower (onnxruntime, fed
    by input name): item token 0, the categories and author as the version's tokens (names
    it never saw: 0), and the content inputs when the version has them."""

    def __init__(self, spec: FeatureSpec, catalogue: Catalogue, item_tower: OnnxModel) -> None:
        self.spec = spec
        self._vocabulary = VersionVocabulary.of(catalogue)
        self._tower = item_tower

    @property
    def dimension(self) -> int:
        return self.spec.embedding_dim

    def inputs(self, items: Sequence[CatalogueItem]) -> Inputs:
        """The item tower's inputs for `items` (each one unknown to the version)."""
        n = len(items)
        categories = np.zeros((n, self.spec.max_categories), dtype=np.int64)
        for row, item in enumerate(items):
            tokens = self._vocabulary.category_tokens(item.categories)
            categories[row, : len(tokens)] = tokens
        inputs: Inputs = {
            "item_id": np.zeros(n, dtype=np.int64),
            "categories": categories,
            "author": np.array([self._vocabulary.author_token(item.author) for item in items], np.int64),
        }
        if self.spec.has_content:
            content = ContentTokens.of(
                self.spec,
                [item.title for item in items],
                [item.publisher for item in items],
                [item.published_at for item in items],
            )
            inputs.update(content.inputs())
        return inputs

    def embed(self, items: Sequence[CatalogueItem]) -> FloatArray:
        """[len(items), embedding_dim] float32, L2-normalised (the tower's last step)."""
        if not items:
            return np.zeros((0, self.dimension), np.float32)
        parts = []
        for start in range(0, len(items), EMBED_BATCH):
            feed = self.inputs(items[start : start + EMBED_BATCH])
            parts.append(np.asarray(self._tower.run(feed)["item_embedding"], dtype=np.float32))
        return np.concatenate(parts)


def embed_items(model: ServingModel | str | Path, items: Sequence[CatalogueItem]) -> FloatArray:
    """Embed items a model version has never seen, from their metadata alone, as its two-tower
    recall would serve them: `model` is a loaded `ServingModel` or a version's directory
    (`ModelStore.version_path(version)`), `items` the items as `UpsertItems` takes them
    (`recsys.feature_store.CatalogueItem`: title, author, categories, publisher, published_at
    in unix seconds; anything missing may be left empty). Returns float32 [len(items),
    embedding_dim], each row L2-normalised: score a user by the dot product with the user
    tower's embedding (`ServingModel.user_embeddings`), as the `two_tower` channel does.

    Every item is embedded as unseen (item token 0), even one whose id the version knows:
    what the item tower gives a brand-new item with that metadata. Versions built with
    content inputs (`FeatureSpec.has_content`) were trained for this (item-id dropout); an
    older version's tower embeds from categories and author only, untrained for a missing id.
    Book-Crossing versions learnt publishers as categories too (`publisher:<name>`): pass
    that category beside `publisher` to give a new book both."""
    from recsys.serving_model import ServingModel

    loaded = model if isinstance(model, ServingModel) else ServingModel.load(Path(model), defer_models=True)
    embedder = loaded.content_embedder
    if embedder is None:
        raise ValueError(f"version {loaded.version}: it has no item tower to embed new items with")
    return embedder.embed(items)


def live_two_tower_source(model: ServingModel, view: NewItems) -> TwoTowerAnnSource | None:
    """The two_tower channel over the version's items and `view`'s servable new items: each new
    item embedded by the version's item tower from its metadata, in a small hnswlib index of
    its own (labels: their dense indexes `n_items + ordinal`) searched beside the version's with
    the same user vector, the two merged by similarity. Withdrawn items are not servable, so
    never in the index. Built off the request path (recall's `prepare_new_items`, in the
    catalogue watcher's thread), rebuilt with each catalogue revision.

    None when there is nothing to add: no servable new item, no two_tower channel, or a version
    whose item tower was not trained for unseen items (no content inputs)."""
    embedder = model.content_embedder
    if not len(view) or embedder is None or not model.spec.has_content or "two_tower" not in model.channels:
        return None
    embeddings = embedder.embed(view.servable_items())
    if not np.isfinite(embeddings).all():
        raise ModelOutputInvalid(f"version {model.version}: the item tower gave a non-finite embedding")
    live = HnswIndex.build(embeddings, labels=view.servable, threads=1)
    return TwoTowerAnnSource(MergedIndex(model.search_index, live))
