"""One model version as the stages use it: core arrays, the ONNX towers and ranker, the
ANN index and the serving defaults. Built in memory by `recsys build` (to evaluate before
publishing) and loaded from the store by `recsys evaluate` and the services: the same
object, so evaluation measures exactly what is served."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from recsys.ann import DeferredHnswIndex, EmbeddingSearch, HnswIndex, serving_index
from recsys.artifacts import CoreArtifacts, Defaults, FloatArray, load_core, load_npy
from recsys.errors import NotReady
from recsys.features import (
    CrossFeatures,
    FeatureSpec,
    Inputs,
    ItemFeatures,
    PairScores,
    Provenance,
    UserFeatures,
    provenance_features,
    ranker_inputs,
    tower_inputs,
)
from recsys.neighbors import NeighborTable
from recsys.onnx_models import DeferredOnnxModel, OnnxModel
from recsys.stages.fusion import Fusion
from recsys.stages.query import UserQuery, build_query
from recsys.stages.sources import (
    AuthorSource,
    CandidateSource,
    GeoSource,
    NeighborSource,
    TwoTowerAnnSource,
    popular_source,
)

USER_TOWER = "two_tower/user_tower.onnx"
ITEM_TOWER = "two_tower/item_tower.onnx"
ITEM_EMBEDDINGS = "two_tower/item_embeddings.npy"
ANN_INDEX = "two_tower/index.hnsw"
RANKER = "ranker/ranker.onnx"
DEFAULTS = "config/defaults.json"
FEATURE_SPEC = "config/feature_spec.json"

if TYPE_CHECKING:
    from recsys.content import ContentEmbedder

ALL_CHANNELS = (
    "itemcf",
    "swing",
    "ease",
    "two_tower",
    "geo",
    "author",
    "cache",
    "popular",
    "new_items",
    "look_alike",
)


@dataclass
class ServingModel:
    version: str
    spec: FeatureSpec
    core: CoreArtifacts
    user_tower: OnnxModel
    item_embeddings: FloatArray
    index: HnswIndex
    ranker: OnnxModel | None  # None: a retrieval-only version (`recsys build --retrieval-only`)
    defaults: Defaults
    capabilities: Mapping[str, Any] = field(default_factory=dict)
    # What embeds items the version has never seen (`content_embedder`); loaded from the
    # store deferred, so that only a process that embeds new items spends its session.
    item_tower: OnnxModel | None = None

    @classmethod
    def load(
        cls, version_dir: Path, version: str | None = None, *, defer_models: bool = False
    ) -> ServingModel:
        """A version from its directory, arrays memory-mapped. `defer_models`: the user
        tower, the ranker and the ANN index are read on first use only, for a process that
        serves from the arrays alone (the gateway)."""
        spec = FeatureSpec.from_json(json.loads((version_dir / FEATURE_SPEC).read_text()))
        defaults = Defaults(**json.loads((version_dir / DEFAULTS).read_text()))
        # A plain ndarray view of the mapping (no copy), as the core's arrays are: gathering
        # rows of an np.memmap builds another memmap object on every request (pre-rank, rerank).
        embeddings = np.asarray(load_npy(version_dir / ITEM_EMBEDDINGS))
        onnx = DeferredOnnxModel if defer_models else OnnxModel
        index = DeferredHnswIndex if defer_models else HnswIndex.load
        manifest = (
            json.loads((version_dir / "manifest.json").read_text())
            if (version_dir / "manifest.json").exists()
            else {}
        )
        return cls(
            version=version or version_dir.name,
            spec=spec,
            core=load_core(version_dir),
            user_tower=onnx(version_dir / USER_TOWER),
            item_embeddings=embeddings,
            index=index(version_dir / ANN_INDEX, dim=int(embeddings.shape[1])),
            ranker=onnx(version_dir / RANKER) if (version_dir / RANKER).exists() else None,
            defaults=defaults,
            capabilities=manifest.get("capabilities", {}),
            item_tower=(
                DeferredOnnxModel(version_dir / ITEM_TOWER, expected=True)
                if (version_dir / ITEM_TOWER).exists()
                else None
            ),
        )

    # -- external ids ----------------------------------------------------------------------
    @cached_property
    def user_lookup(self) -> dict[str, int]:
        return {str(user): index for index, user in enumerate(self.core.users.user_ids.tolist())}

    @cached_property
    def item_lookup(self) -> dict[str, int]:
        return {str(item): index for index, item in enumerate(self.core.catalogue.item_ids.tolist())}

    @cached_property
    def region_lookup(self) -> dict[str, int]:
        regions = self.core.users.region_vocab.tolist()
        return {str(region): token for token, region in enumerate(regions, start=1)}

    @cached_property
    def item_digests(self) -> npt.NDArray[np.uint64]:
        """Each item's exposure-filter hash, computed once per version instead of per request."""
        from recsys.feature_store.bloom import item_digests

        return item_digests([str(item) for item in self.core.catalogue.item_ids.tolist()])

    def warm(self) -> None:
        """Build the lookups and feature tables now (at load, in the loading thread) rather
        than on the first request."""
        for name in (
            "user_lookup",
            "item_lookup",
            "region_lookup",
            "item_features",
            "user_features",
            "item_digests",
        ):
            getattr(self, name)
        _ = self.sources
        _ = self.cross_features

    # -- features ------------------------------------------------------------------------
    @cached_property
    def item_features(self) -> ItemFeatures:
        return ItemFeatures(self.core.catalogue, self.core.statistics)

    @cached_property
    def content_embedder(self) -> ContentEmbedder | None:
        """Embeds items from their metadata alone (`recsys.content`); None without an item tower."""
        from recsys.content import ContentEmbedder

        if self.item_tower is None:
            return None
        return ContentEmbedder(self.spec, self.core.catalogue, self.item_tower)

    @cached_property
    def user_features(self) -> UserFeatures:
        return UserFeatures(self.spec, self.core.users, self.core.statistics)

    def user_inputs(
        self,
        query: UserQuery,
        history_items: npt.NDArray[Any] | None = None,
        history_liked: npt.NDArray[np.bool_] | None = None,
    ) -> Inputs:
        items = query.recent_items if history_items is None else history_items
        liked = query.recent_liked if history_liked is None else history_liked
        return self.user_features.inputs(query.user_index, items, liked, query.region_token)

    def user_embeddings(self, user_inputs: list[Inputs]) -> FloatArray:
        """Run the user tower on many users at once (a batch of their inputs)."""
        if not user_inputs:
            return np.zeros((0, self.item_embeddings.shape[1]), np.float32)
        batch = {name: np.concatenate([inputs[name] for inputs in user_inputs]) for name in user_inputs[0]}
        embedding: FloatArray = self.user_tower.run(tower_inputs(batch))["user_embedding"]
        return embedding

    def query(self, user_index: int, **kwargs: Any) -> UserQuery:
        return build_query(self.core, user_index, recent_limit=self.defaults.recent_items, **kwargs)

    # -- stages ----------------------------------------------------------------------------
    @cached_property
    def channels(self) -> tuple[str, ...]:
        names = ["itemcf", "swing"]
        if self.core.ease is not None:  # versions built without EASE lack the channel
            names.append("ease")
        names.append("two_tower")
        if self.core.users.region_vocab.shape[0] > 0:
            names.append("geo")
        if self.core.catalogue.author_vocab.shape[0] > 0:
            names.append("author")
        names.append("popular")
        return tuple(names)

    @cached_property
    def search_index(self) -> EmbeddingSearch:
        """What the two-tower channel searches (`serving_index`: exact for a small catalogue;
        then the ANN index is never read, which a deferred one never loads)."""
        return serving_index(self.index, self.item_embeddings)

    @cached_property
    def sources(self) -> dict[str, CandidateSource]:
        """The offline-evaluable channels (the cache channel needs the feature store)."""
        available: dict[str, CandidateSource] = {
            "itemcf": self._neighbor_source("itemcf", self.core.itemcf),
            "swing": self._neighbor_source("swing", self.core.swing),
            "two_tower": TwoTowerAnnSource(self.search_index),
            "geo": GeoSource(self.core.popularity),
            "author": AuthorSource(self.core.authors),
            "popular": popular_source(self.core.popularity),
        }
        if self.core.ease is not None:
            available["ease"] = self._neighbor_source("ease", self.core.ease)
        return {name: available[name] for name in self.channels}

    def _neighbor_source(self, name: str, table: NeighborTable) -> NeighborSource:
        weighting = self.defaults.weighting(name)
        return NeighborSource(
            name,
            table,
            decay=weighting.decay,
            liked_boost=weighting.liked_boost,
            history_items=weighting.items,
        )

    @cached_property
    def cross_features(self) -> CrossFeatures:
        return CrossFeatures(
            PairScores(self.core.itemcf.neighbors, self.core.itemcf.scores),
            PairScores(self.core.swing.neighbors, self.core.swing.scores),
            self.item_embeddings,
        )

    def score(
        self,
        user: Inputs,
        item_indexes: npt.NDArray[Any],
        user_embedding: FloatArray | None = None,
        provenance: Provenance | None = None,
    ) -> dict[str, FloatArray]:
        """Every head's probability for one user's candidates. Without a user embedding
        (recall did not send one) the user tower computes it; without a provenance (no recall
        answer) every candidate reads as found by no channel."""
        if self.ranker is None:
            raise NotReady(f"version {self.version} is retrieval-only: it has no ranker")
        if len(item_indexes) == 0:
            return {head: np.zeros(0, np.float32) for head in self.spec.heads}
        if user_embedding is None:
            user_embedding = self.user_embeddings([user])[0]
        outputs = self.ranker.run(self.ranker_batch(user, item_indexes, user_embedding, provenance))
        return {head: np.asarray(outputs[head], dtype=np.float32).reshape(-1) for head in self.spec.heads}

    def ranker_batch(
        self,
        user: Inputs,
        item_indexes: npt.NDArray[Any],
        user_embedding: FloatArray | None,
        provenance: Provenance | None = None,
    ) -> Inputs:
        """The ranker's inputs for one user's candidates: what `score` runs and what the
        build trains on (training/examples.py `candidate_rows`), one assembly for both."""
        items = np.asarray(item_indexes)
        batch = ranker_inputs(user, self.item_features.inputs(items))
        batch.update(
            self.cross_features.inputs(
                batch["history"], batch["history_weight"], items, user_embedding, one_user=True
            )
        )
        if self.spec.provenance_channels:
            batch["provenance"] = self.provenance_inputs(provenance, items.shape[0])
        return batch

    def provenance_inputs(self, provenance: Provenance | None, n: int) -> FloatArray:
        """The ranker's `provenance` input for one user's `n` candidates."""
        if provenance is None:
            provenance = Provenance.absent(n)
        elif len(provenance) != n:
            raise ValueError(f"provenance: {len(provenance)} rows for {n} candidates")
        return provenance_features(self.spec.provenance_channels, provenance)

    def default_fusion(self) -> Fusion:
        return Fusion("weighted_sum", {head: 1.0 for head in self.spec.heads if head != "click"})


def defaults_json(defaults: Defaults) -> dict[str, Any]:
    return asdict(defaults)
