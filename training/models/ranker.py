"""Multi-task ranker: MMoE (Ma et al. 2018) over user, item, cross and provenance features,
one sigmoid head per task (`click`: the user consumed the candidate; `like`: rated it at or
above the like threshold).

Trained on recall's own candidates (training/examples.py `candidate_rows`): each head with
binary cross-entropy, and the click head's logit also with a list-wise softmax over each
user's candidate list (`list_weight`), the served task being to order one user's
candidates. The list-wise score reaches the served fused score through `p_click`, a
monotone function of that same logit: no extra head, and the scenes' fusions keep working."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from recsys.evaluation.metrics import auc
from recsys.features import FeatureSpec, Inputs
from training.distributed import Distribution, scope
from training.models.layers import (
    din_attention,
    masked_mean,
    mlp,
    target_attention,
    weighted_mean,
    weighted_sum,
)

ATTENTIONS = ("dot", "din")


@dataclass(frozen=True)
class RankerConfig:
    id_dim: int = 32
    side_dim: int = 8
    experts: int = 3
    expert_units: tuple[int, ...] = (128, 64)
    tower_units: int = 32
    dropout: float = 0.1
    batch_size: int = 1024
    epochs: int = 8
    learning_rate: float = 2e-3
    holdout_fraction: float = 0.1  # rows (by user) kept aside to pick the best epoch
    negatives_per_positive: int = 4
    # Negatives ∝ popularity^exponent. The pipeline's NDCG@10 (full profile, MovieLens-100K)
    # for 0.5 / 0.25 / 0 (uniform): 0.222 / 0.234 / 0.229, and the held-out AUC, measured with
    # the same exponent: 0.77 / 0.81 / 0.86. The lower the exponent, the more plain popularity
    # separates positives from negatives: AUC gets easier without the ranker getting better,
    # and the ranker learns less of what tells a user's next item from a popular one (0.75 gave
    # NDCG 0.211 on the quick profile). 0.25 is still popularity-shaped and ranks best.
    negative_exponent: float = 0.25
    # Rows from recall's candidates: per user at most this many candidate negatives (a
    # seeded sample) and this many random ones from outside the candidates.
    candidate_negatives: int = 100
    random_negatives: int = 4
    # Weight of the list-wise softmax loss on the click logit beside the heads' cross-entropy.
    list_weight: float = 1.0
    # History pooling toward the candidate: "dot" (scaled dot-product softmax) or "din"
    # (DIN's activation unit, Zhou et al. 2018: an MLP on [h, t, h−t, h·t], unnormalised).
    attention: str = "dot"
    seed: int = 0


def build_ranker(spec: FeatureSpec, config: RankerConfig, matmul: bool = False) -> keras.Model:
    """The multi-task ranker. `matmul`: the formulation to export (see training.models.layers);
    the same layers in the same order, so a twin takes the trained model's weights."""
    if config.attention not in ATTENTIONS:
        raise ValueError(f"attention: must be one of {', '.join(ATTENTIONS)}, got {config.attention!r}")
    keras.utils.set_random_seed(config.seed)
    inputs = {
        item.name: keras.Input(shape=item.shape[1:], dtype=item.dtype, name=item.name)
        for item in spec.ranker_inputs()
    }
    item_ids = keras.layers.Embedding(spec.n_item_tokens, config.id_dim, name="item_id_embedding")
    users = keras.layers.Embedding(spec.n_user_tokens, config.id_dim, name="user_id_embedding")
    categories = keras.layers.Embedding(spec.n_category_tokens, config.side_dim, name="category_embedding")
    authors = keras.layers.Embedding(spec.n_author_tokens, config.side_dim, name="author_embedding")
    regions = keras.layers.Embedding(spec.n_region_tokens, config.side_dim, name="region_embedding")

    target = item_ids(inputs["item_id"])
    history = item_ids(inputs["history"])
    pooled = weighted_mean(history, inputs["history_weight"], matmul)
    if config.attention == "din":
        attended = din_attention(history, inputs["history_weight"], target, name="din", matmul=matmul)
    else:
        attended = target_attention(history, inputs["history_weight"], target, matmul)
    user = users(inputs["user_id"])
    features = keras.layers.Concatenate(name="features")(
        [
            user,
            regions(inputs["region"]),
            pooled,
            attended,
            inputs["user_stats"],
            target,
            masked_mean(categories(inputs["categories"]), inputs["categories"]),
            authors(inputs["author"]),
            inputs["item_stats"],
            inputs["cross_features"],
            inputs["user_vector"],
            inputs["item_vector"],
            ops.sum(inputs["user_vector"] * inputs["item_vector"], axis=-1, keepdims=True),
            # Explicit crosses: how close the candidate is to the user and to the history.
            ops.sum(pooled * target, axis=-1, keepdims=True),
            ops.sum(attended * target, axis=-1, keepdims=True),
            ops.sum(user * target, axis=-1, keepdims=True),
            # Where recall found the candidate: each channel's rank and score, the merge's.
            *([inputs["provenance"]] if "provenance" in inputs else []),
        ]
    )
    experts = [
        mlp(list(config.expert_units), f"expert{index}", config.dropout)(features)
        for index in range(config.experts)
    ]
    stacked = ops.stack(experts, axis=1)  # [batch, experts, units]
    outputs = {}
    for head in spec.heads:
        gate = keras.layers.Dense(config.experts, activation="softmax", name=f"{head}_gate")(features)
        mixed = weighted_sum(stacked, gate, matmul)  # Σ gateₑ·expertₑ
        tower = mlp([config.tower_units], f"{head}_tower")(mixed)
        logit = keras.layers.Dense(1, name=f"{head}_logit")(tower)
        outputs[head] = ops.squeeze(ops.sigmoid(logit), axis=-1)
    return keras.Model(inputs, outputs, name="ranker")


def serving_twin(model: keras.Model, spec: FeatureSpec, config: RankerConfig) -> keras.Model:
    """The trained ranker in the formulation that is exported (`matmul=True`), with its weights."""
    twin = build_ranker(spec, config, matmul=True)
    # By layer name (every layer with weights is named): the two graphs' ops differ, and so
    # may the order Keras lists their weights in.
    trained = {layer.name: layer for layer in model.layers if layer.weights}
    for layer in twin.layers:
        if layer.weights:
            layer.set_weights(trained.pop(layer.name).get_weights())
    if trained:
        raise ValueError(f"model: layers {sorted(trained)} have no twin in the exported formulation")
    return twin


def train_ranker(
    model: keras.Model,
    inputs: Inputs,
    labels: dict[str, np.ndarray],
    config: RankerConfig,
    group: np.ndarray | None = None,
    progress: Callable[[int, float], None] | None = None,
    distribution: Distribution | None = None,
) -> RankerTraining:
    """Fit `model` on rows (one list per `group` value, a user's rows contiguous; None: each
    row alone, no list-wise loss), keeping the epoch that ranks a held-out slice of the
    users best (mean NDCG@10 of their lists; AUC without lists).

    With a `distribution` (the model built under its scope), every worker packs the same
    global batches of whole lists and trains on its share of each batch's lists (a batch
    with fewer lists than workers is skipped by all); the gradients are summed across
    workers. Every worker scores the whole held-out slice, and picks the epoch by the mean
    over workers of that score: the same number everywhere, so all stop at one epoch."""
    rng = np.random.default_rng(config.seed)
    with scope(distribution):  # its slots mirrored like the weights they follow
        optimizer = keras.optimizers.Adam(config.learning_rate)
    heads = list(labels)
    logits_model = keras.Model(
        model.inputs, {head: model.get_layer(f"{head}_logit").output for head in heads}
    )
    list_weight = config.list_weight if group is not None else 0.0
    listwise = group is not None  # lists to judge epochs by, whatever the loss

    def local_step(
        batch: dict[str, tf.Tensor], targets: dict[str, tf.Tensor], segments: tf.Tensor, lists: tf.Tensor
    ) -> tf.Tensor:
        with tf.GradientTape() as tape:
            logits = {
                head: tf.squeeze(value, -1) for head, value in logits_model(batch, training=True).items()
            }
            loss = tf.add_n(
                [
                    tf.reduce_mean(
                        tf.nn.sigmoid_cross_entropy_with_logits(labels=targets[head], logits=logits[head])
                    )
                    for head in heads
                ]
            )
            if list_weight > 0:
                loss += list_weight * _list_loss(logits["click"], targets["click"], segments, lists)
            # Keras sums the workers' gradients: each worker's mean counts for its share.
            scaled = loss if distribution is None else loss / distribution.workers
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return loss

    if distribution is None:
        step = tf.function(local_step, reduce_retracing=True)
    else:
        strategy = distribution.strategy
        distribution.check_same(
            "ranker rows", [*inputs.values(), *labels.values(), *([] if group is None else [group])]
        )

        @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]
        def step(
            batch: dict[str, tf.Tensor], targets: dict[str, tf.Tensor], segments: tf.Tensor, lists: tf.Tensor
        ) -> tf.Tensor:
            losses = strategy.run(local_step, args=(batch, targets, segments, lists))
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)

    if group is None:
        group = np.arange(inputs["item_id"].shape[0], dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], group.shape[0]]
    # Early stopping on a slice of users: the ranker trains on one period's rows, few
    # enough that a bigger model overfits within a few epochs.
    user_key = inputs["user_id"][starts] % 1000
    held = user_key < int(config.holdout_fraction * 1000)
    fit_lists, held_lists = np.flatnonzero(~held), np.flatnonzero(held)
    held_rows = _rows(starts, ends, held_lists)
    held_inputs = {name: value[held_rows] for name, value in inputs.items()}
    held_group = np.repeat(np.arange(held_lists.shape[0]), (ends - starts)[held_lists])

    def validation_score() -> float:
        if not held_rows.size:
            return 0.0
        predicted = predict(model, held_inputs)["click"]
        truth = labels["click"][held_rows]
        score = mean_list_ndcg(predicted, truth, held_group) if listwise else auc(predicted, truth)
        if distribution is None:
            return score
        return float(distribution.sum(np.array([score]))[0]) / distribution.workers

    best_score, best_weights = -1.0, model.get_weights()
    losses, scores = [], []
    for epoch in range(config.epochs):
        order = fit_lists[rng.permutation(fit_lists.shape[0])]
        total, batches = 0.0, 0
        for chunk in _batches(starts, ends, order, config.batch_size):
            if distribution is not None:
                if chunk.shape[0] < distribution.workers:
                    continue  # a worker would get no list (the same on every worker)
                chunk = distribution.shard(chunk)
            rows = _rows(starts, ends, chunk)
            segments = np.repeat(np.arange(chunk.shape[0], dtype=np.int32), (ends - starts)[chunk])
            batch = {name: tf.constant(value[rows]) for name, value in inputs.items()}
            targets = {head: tf.constant(labels[head][rows].astype(np.float32)) for head in heads}
            total += float(step(batch, targets, tf.constant(segments), tf.constant(chunk.shape[0])))
            batches += 1
        losses.append(total / max(batches, 1))
        scores.append(validation_score())
        if progress is not None:
            progress(epoch, losses[-1])
        if scores[-1] > best_score:
            best_score, best_weights = scores[-1], model.get_weights()
        elif epoch >= 1:
            break
    model.set_weights(best_weights)
    return RankerTraining(losses, scores, best_score, "ndcg@10" if listwise else "auc")


@dataclass(frozen=True)
class RankerTraining:
    losses: list[float]
    validation: list[float]  # per epoch, on the held-out slice of users
    best: float
    metric: str


def _list_loss(logits: tf.Tensor, clicks: tf.Tensor, segments: tf.Tensor, lists: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy of each list's positives against all its rows:
    mean over lists with a positive of logsumexp(list) − mean(positive logits)."""
    peak = tf.math.unsorted_segment_max(logits, segments, lists)
    shifted = tf.exp(logits - tf.gather(peak, segments))
    logsumexp = tf.math.log(tf.math.unsorted_segment_sum(shifted, segments, lists)) + peak
    positives = tf.math.unsorted_segment_sum(clicks, segments, lists)
    positive_logits = tf.math.unsorted_segment_sum(logits * clicks, segments, lists)
    has = positives > 0
    per_list = logsumexp - positive_logits / tf.maximum(positives, 1.0)
    return tf.reduce_sum(tf.where(has, per_list, 0.0)) / tf.maximum(
        tf.reduce_sum(tf.cast(has, tf.float32)), 1.0
    )


def _rows(starts: np.ndarray, ends: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """The row indexes of `lists` (in that order)."""
    if lists.shape[0] == 0:
        return np.zeros(0, np.int64)
    lengths = ends[lists] - starts[lists]
    offsets = np.repeat(starts[lists] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    rows: np.ndarray = (np.arange(lengths.sum()) + offsets).astype(np.int64)
    return rows


def _batches(starts: np.ndarray, ends: np.ndarray, order: np.ndarray, size: int) -> list[np.ndarray]:
    """Whole lists packed into batches of about `size` rows."""
    lengths = (ends - starts)[order]
    cuts = np.flatnonzero(np.diff(np.cumsum(lengths) // size)) + 1
    return [chunk for chunk in np.split(order, cuts) if chunk.shape[0]]


def mean_list_ndcg(scores: np.ndarray, relevant: np.ndarray, group: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over lists (rows of a list contiguous in `group`) with a positive."""
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], group.shape[0]]
    values = []
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for start, end in zip(starts, ends, strict=True):
        truth = relevant[start:end]
        if not truth.any():
            continue
        top = np.argsort(-scores[start:end], kind="stable")[:k]
        ideal = discounts[: min(k, int(truth.sum()))].sum()
        values.append(float((truth[top] * discounts[: top.shape[0]]).sum() / ideal))
    return float(np.mean(values)) if values else 0.0


def predict(model: keras.Model, inputs: Inputs, batch: int = 8192) -> dict[str, np.ndarray]:
    n = int(inputs["item_id"].shape[0])
    parts: dict[str, list[Any]] = {}
    for start in range(0, n, batch):
        chunk = {name: value[start : start + batch] for name, value in inputs.items()}
        for head, value in model(chunk, training=False).items():
            parts.setdefault(head, []).append(np.asarray(value))
    return {head: np.concatenate(values).astype(np.float32) for head, values in parts.items()}
