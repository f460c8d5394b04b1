"""`ModelProbe`: prove a version's ONNX models answer sanely before it serves.

Checksums prove the files are the ones the build wrote, not that what the build wrote is
usable: a training run that diverged exports NaN weights with perfectly valid checksums, and
every call would then fail far from the cause (the gateway's rerank refusing non-finite
rewards). So loading a version also runs each model on a probe batch built from the
version's own data (users spread over the user base with their histories, the unknown user,
items spread over the catalogue and the unknown item) and refuses the version when:

- an embedding (user tower, item tower, the stored item embeddings) is non-finite or has a
  zero norm (the ANN index and pre-rank would rank by garbage);
- a task probability is non-finite or outside [0, 1];
- a fused score (the default fusion and any the caller serves) is non-finite.

One implementation for the services' loaders, the build (before publishing) and
`recsys store verify`. numpy and onnxruntime only: no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.content import ContentEmbedder, ContentTokens
from recsys.feature_store import CatalogueItem
from recsys.onnx_models import OnnxModel
from recsys.serving_model import ITEM_TOWER, ServingModel
from recsys.stages.fusion import Fusion
from recsys.stages.query import liked_mask
from recsys.store.layout import StoreIntegrityError

PROBE_USERS = 16
PROBE_ITEMS = 64
# Metadata no version knows (its words and publisher hash to buckets all the same).
PROBE_NEW_ITEM = CatalogueItem(
    "probe-new-item", "A Probe Of The Unknown", "Nobody Known", ("no such category",), "No Press", 1.7e9
)


class ModelProbeError(StoreIntegrityError):
    """A model of the version gives unusable outputs. As final as a checksum mismatch: loading
    the same files again gives the same outputs, so the version is refused, not retried."""


@dataclass(frozen=True)
class ProbeReport:
    users: int  # probe users (the unknown one included)
    items: int  # probe items per user (the unknown one included)
    models: tuple[str, ...]  # what was run or checked

    def summary(self) -> str:
        return f"{', '.join(self.models)} finite and in range on {self.users} users x {self.items} items"


def _spread(count: int, wanted: int) -> npt.NDArray[np.int64]:
    """Up to `wanted` indexes spread evenly over [0, count): first, last and between."""
    if count <= 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, count - 1, num=min(wanted, count)).round().astype(np.int64))


def _check_embeddings(name: str, vectors: npt.NDArray[Any]) -> None:
    values = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)
    bad_rows = ~np.isfinite(values).all(axis=1)
    if bad_rows.any():
        raise ModelProbeError(f"{name}: {int(bad_rows.sum())} of {len(values)} embeddings are not finite")
    zero = np.linalg.norm(values, axis=1) == 0
    if zero.any():
        raise ModelProbeError(f"{name}: {int(zero.sum())} of {len(values)} embeddings have a zero norm")


def check_item_embeddings(model: ServingModel) -> None:
    """The stored item embeddings feed the ANN index, pre-rank and rerank: all of them, not a
    sample (a zero vector for one item is enough to make it unreachable or always first). The
    part of the probe a process that runs none of the models (the gateway) needs."""
    _check_embeddings("two_tower/item_embeddings.npy", model.item_embeddings)


def _check_probabilities(name: str, values: npt.NDArray[Any]) -> None:
    probabilities = np.asarray(values, dtype=np.float64)
    if not np.isfinite(probabilities).all():
        bad = int((~np.isfinite(probabilities)).sum())
        raise ModelProbeError(f"{name}: {bad} of {probabilities.size} probabilities are not finite")
    outside = (probabilities < 0) | (probabilities > 1)
    if outside.any():
        raise ModelProbeError(
            f"{name}: {int(outside.sum())} of {probabilities.size} probabilities are outside [0, 1]"
            f" (e.g. {float(probabilities[outside][0])})"
        )


class ModelProbe:
    identifier = "model_probe"

    def __init__(self, users: int = PROBE_USERS, items: int = PROBE_ITEMS) -> None:
        self._users = users
        self._items = items

    def run(
        self, model: ServingModel, version_dir: Path | None = None, fusions: Sequence[Fusion] = ()
    ) -> ProbeReport:
        """Raise ModelProbeError naming the model and what is wrong; `version_dir` lets the
        item tower (which serving does not load) be probed too."""
        core = model.core
        checked: list[str] = []
        check_item_embeddings(model)
        checked.append("item embeddings")

        items = np.append(_spread(core.catalogue.n_items, self._items - 1), -1)
        if version_dir is not None and (version_dir / ITEM_TOWER).exists():
            tower = OnnxModel(version_dir / ITEM_TOWER)
            own = items[items >= 0]
            feed = model.item_features.inputs(own, with_stats=False)
            if model.spec.has_content:
                catalogue = core.catalogue
                content = ContentTokens.of(
                    model.spec,
                    [str(title) for title in np.asarray(catalogue.titles)[own].tolist()],
                    [""] * own.shape[0],
                    np.asarray(catalogue.item_time, dtype=np.float64)[own],
                )
                feed.update(content.inputs())
            outputs = tower.run(feed)
            for name, value in outputs.items():
                _check_embeddings(f"{ITEM_TOWER} ({name})", value)
            # And an item the version has never seen, as recall embeds one upserted while serving.
            unseen = ContentEmbedder(model.spec, core.catalogue, tower).embed([PROBE_NEW_ITEM])
            _check_embeddings(f"{ITEM_TOWER} (a new item)", unseen)
            checked.append("item tower")

        users = [self._user_inputs(model, int(user)) for user in _spread(core.users.n_users, self._users - 1)]
        users.append(model.user_features.inputs(-1, np.zeros(0, np.int64), np.zeros(0, bool)))
        embeddings = model.user_embeddings(users)
        _check_embeddings("two_tower/user_tower.onnx", embeddings)
        checked.append("user tower")

        if model.ranker is not None:
            every_fusion = [model.default_fusion(), *fusions]
            for user, embedding in zip(users, embeddings, strict=True):
                scores = model.score(user, items, user_embedding=embedding)
                for head, values in scores.items():
                    _check_probabilities(f"ranker/ranker.onnx (head {head})", values)
                for fusion in every_fusion:
                    fused = fusion.fuse(scores)
                    if not np.isfinite(fused).all():
                        weights = dict(fusion.weights)
                        raise ModelProbeError(f"fusion {fusion.method} {weights}: non-finite scores")
            checked.append("ranker")
        return ProbeReport(len(users), int(items.shape[0]), tuple(checked))

    @staticmethod
    def _user_inputs(model: ServingModel, user: int) -> dict[str, npt.NDArray[Any]]:
        history = model.core.history
        recent = np.asarray(history.items.row(user), dtype=np.int64)
        liked = liked_mask(model.core.like_threshold, np.asarray(history.ratings.row(user)))
        return model.user_features.inputs(user, recent, liked)


def probe(
    model: ServingModel, version_dir: Path | None = None, fusions: Sequence[Fusion] = ()
) -> ProbeReport:
    """`ModelProbe().run(...)`: the check every loader runs."""
    return ModelProbe().run(model, version_dir, fusions)
