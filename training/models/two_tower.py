"""Two-tower retrieval: a user tower (id, region, pooled recent history) and an item tower
(id, categories, author and, where the spec has them, the content inputs of
`recsys.content`: hashed publisher, publication-year bucket, hashed title words), both
L2-normalised, trained with in-batch sampled softmax, a temperature, and the logQ correction
for the popularity bias of in-batch negatives (Yi et al. 2019, "Sampling-bias-corrected
neural modeling").

Item-id dropout replaces a share of the training rows' item token by 0 (unknown) in the
item tower, so the tower also learns to place an item from its metadata alone: what it is
asked for an item upserted while serving, which no id embedding knows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from recsys.features import FeatureSpec, Inputs
from training.distributed import Distribution, scope
from training.examples import RowInputs
from training.models.layers import l2_normalize, masked_mean, mlp, weighted_mean


@dataclass(frozen=True)
class TwoTowerConfig:
    embedding_dim: int = 64
    id_dim: int = 64
    side_dim: int = 16
    hidden: int = 128
    temperature: float = 0.07
    batch_size: int = 512
    epochs: int = 8
    learning_rate: float = 2e-3
    user_id_dropout: float = 0.2  # so the tower also works from history alone (new users)
    item_id_dropout: float = 0.2  # so the item tower also works from content alone (new items)
    # Content inputs (0 title buckets: none, the tower reads id, categories and author only).
    # Few title buckets and words: on MovieLens-100K (quick profile) 16,384 buckets × 8 words
    # gave two_tower recall@200 0.675, 2,048 × 4 gave 0.693 (0.709 without content inputs):
    # a title's words are nearly an item's id, and fewer of them memorise less.
    publisher_buckets: int = 4096
    title_buckets: int = 2048
    max_title_tokens: int = 4
    holdout_fraction: float = 0.05  # users whose rows pick the best epoch
    seed: int = 0


@dataclass
class TwoTower:
    user_model: keras.Model
    item_model: keras.Model
    config: TwoTowerConfig


def _inputs(specs: list[Any]) -> dict[str, Any]:
    return {spec.name: keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=spec.name) for spec in specs}


def build_two_tower(spec: FeatureSpec, config: TwoTowerConfig) -> TwoTower:
    keras.utils.set_random_seed(config.seed)  # initial weights follow the build's seed
    item_ids = keras.layers.Embedding(spec.n_item_tokens, config.id_dim, name="item_id_embedding")
    categories = keras.layers.Embedding(spec.n_category_tokens, config.side_dim, name="category_embedding")
    authors = keras.layers.Embedding(spec.n_author_tokens, config.side_dim, name="author_embedding")
    users = keras.layers.Embedding(spec.n_user_tokens, config.id_dim, name="user_id_embedding")
    regions = keras.layers.Embedding(spec.n_region_tokens, config.side_dim, name="region_embedding")

    user_in = _inputs(spec.user_tower_inputs())
    history = weighted_mean(item_ids(user_in["history"]), user_in["history_weight"])
    user_features = keras.layers.Concatenate()(
        [users(user_in["user_id"]), regions(user_in["region"]), history]
    )
    user_hidden = mlp([config.hidden], "user_mlp")(user_features)
    user_vector = l2_normalize(keras.layers.Dense(config.embedding_dim, name="user_projection")(user_hidden))
    user_model = keras.Model(user_in, {"user_embedding": user_vector}, name="user_tower")

    item_in = _inputs(spec.item_tower_inputs())
    item_parts = [
        item_ids(item_in["item_id"]),
        masked_mean(categories(item_in["categories"]), item_in["categories"]),
        authors(item_in["author"]),
    ]
    if spec.has_content:
        publishers = keras.layers.Embedding(
            spec.n_publisher_buckets, config.side_dim, name="publisher_embedding"
        )
        years = keras.layers.Embedding(spec.n_year_buckets, config.side_dim, name="year_embedding")
        titles = keras.layers.Embedding(spec.n_title_buckets, config.side_dim, name="title_embedding")
        item_parts += [
            publishers(item_in["publisher"]),
            years(item_in["publication_year"]),
            masked_mean(titles(item_in["title_tokens"]), item_in["title_tokens"]),
        ]
    item_features = keras.layers.Concatenate()(item_parts)
    item_hidden = mlp([config.hidden], "item_mlp")(item_features)
    item_vector = l2_normalize(keras.layers.Dense(config.embedding_dim, name="item_projection")(item_hidden))
    item_model = keras.Model(item_in, {"item_embedding": item_vector}, name="item_tower")
    return TwoTower(user_model, item_model, config)


def train_two_tower(
    model: TwoTower,
    user_inputs: RowInputs,
    item_inputs: RowInputs,
    item_log_q: np.ndarray,
    progress: Callable[[int, float], None] | None = None,
    distribution: Distribution | None = None,
) -> list[float]:
    """Fit on aligned (user inputs, positive item inputs) rows; `item_log_q[r]` is the log
    sampling probability of row r's item (its share of the training rows). Returns the
    mean loss per epoch.

    With a `distribution` (the towers built under its scope), every worker draws the same
    global batches and trains on its slice of each. The workers' item embeddings are
    gathered, so a row's in-batch negatives are the whole global batch, as in one process:
    the same loss, and the same gradients (summed across workers). Every worker computes the
    held-out loss on the whole held-out slice, and stops by the mean over workers: the same
    number everywhere, so all stop at one epoch."""
    config = model.config
    rng = np.random.default_rng(config.seed)
    with scope(distribution):  # its slots mirrored like the weights they follow
        optimizer = keras.optimizers.Adam(config.learning_rate)
    variables = model.user_model.trainable_variables + [
        v
        for v in model.item_model.trainable_variables
        if not any(v is u for u in model.user_model.trainable_variables)
    ]
    inverse_temperature = 1.0 / config.temperature

    def batch_loss(
        users: dict[str, tf.Tensor],
        items: dict[str, tf.Tensor],
        keys: tf.Tensor,
        log_q: tf.Tensor,
        training: bool,
        first: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """Mean softmax loss of the rows; `first`: in a replica of a distribution, the rows'
        position in the global batch, whose items (gathered from every worker) are the
        candidates."""
        u = model.user_model(users, training=training)["user_embedding"]
        v = model.item_model(items, training=training)["item_embedding"]
        candidate_keys = keys
        if first is not None:
            # all_gather stacks the replicas in worker order, as `Distribution.shard` slices;
            # its gradient sends each worker's share back to the items it embedded. (The
            # identity places the function's inputs on the replica's device: all_gather of a
            # tensor with no device fails, "destinations can not be empty".)
            context = tf.distribute.get_replica_context()
            v, candidate_keys, log_q = (
                context.all_gather(tf.identity(value), axis=0) for value in (v, keys, log_q)
            )
        logits = tf.matmul(u, v, transpose_b=True) * inverse_temperature - log_q[None, :]
        # The same item twice in a batch is not a negative of itself (by its real token: two
        # rows whose id was dropped are still two items).
        same = tf.equal(keys[:, None], candidate_keys[None, :])
        if first is None:
            diagonal = tf.eye(tf.shape(logits)[0], dtype=tf.bool)
            labels = tf.range(tf.shape(logits)[0])
        else:
            labels = first + tf.range(tf.shape(logits)[0])
            diagonal = tf.equal(labels[:, None], tf.range(tf.shape(logits)[1])[None, :])
        logits = tf.where(same & ~diagonal, tf.fill(tf.shape(logits), -1e9), logits)
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

    def local_step(
        users: dict[str, tf.Tensor],
        items: dict[str, tf.Tensor],
        keys: tf.Tensor,
        log_q: tf.Tensor,
        first: tf.Tensor | None = None,
    ) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = batch_loss(users, items, keys, log_q, True, first)
            # Keras sums the workers' gradients: each worker's mean counts for its share.
            scaled = loss if distribution is None else loss / distribution.workers
        gradients = tape.gradient(scaled, variables)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return loss

    if distribution is None:
        step = tf.function(local_step, reduce_retracing=True)
    else:
        strategy = distribution.strategy
        columns = [*user_inputs.values(), *item_inputs.values()]
        distribution.check_same("two-tower rows", chain((column[:] for column in columns), [item_log_q]))

        @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]
        def distributed_step(
            users: dict[str, tf.Tensor],
            items: dict[str, tf.Tensor],
            keys: tf.Tensor,
            log_q: tf.Tensor,
            first: tf.Tensor,
        ) -> tf.Tensor:
            losses = strategy.run(local_step, args=(users, items, keys, log_q, first))
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)

    @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]
    def held_loss(
        users: dict[str, tf.Tensor], items: dict[str, tf.Tensor], keys: tf.Tensor, log_q: tf.Tensor
    ) -> tf.Tensor:
        return batch_loss(users, items, keys, log_q, False)

    # Early stopping on the rows of a slice of users: on sparse data (many users with a few
    # interactions) the id embeddings memorise within a few epochs.
    held = (np.asarray(user_inputs["user_id"][:]) % 1000) < int(config.holdout_fraction * 1000)
    train_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
    best_loss, best_weights, worse = np.inf, _weights(model), 0
    losses = []
    for epoch in range(config.epochs):
        order = train_rows[rng.permutation(train_rows.shape[0])]
        total, batches = 0.0, 0
        for start in range(0, order.shape[0] - config.batch_size + 1, config.batch_size):
            rows = order[start : start + config.batch_size]
            # Drawn for the whole global batch (the same draws on every worker), then sliced.
            user_ids = user_inputs["user_id"][rows]
            if config.user_id_dropout:
                user_ids = np.where(rng.random(rows.shape[0]) < config.user_id_dropout, 0, user_ids)
            keys = item_inputs["item_id"][rows]
            item_ids = keys
            if config.item_id_dropout:
                item_ids = np.where(rng.random(rows.shape[0]) < config.item_id_dropout, 0, keys)
            mine: slice | np.ndarray = slice(None)
            first = None  # where this worker's rows start in the global batch
            if distribution is not None:
                mine = distribution.shard(np.arange(rows.shape[0]))
                first = int(mine[0])
            rows, user_ids, keys, item_ids = rows[mine], user_ids[mine], keys[mine], item_ids[mine]
            users = {name: tf.constant(value[rows]) for name, value in user_inputs.items()}
            users["user_id"] = tf.constant(user_ids)
            items = {name: tf.constant(value[rows]) for name, value in item_inputs.items()}
            items["item_id"] = tf.constant(item_ids)
            batch = (users, items, tf.constant(keys), tf.constant(item_log_q[rows], dtype=tf.float32))
            loss = step(*batch) if first is None else distributed_step(*batch, tf.constant(first))
            total += float(loss)
            batches += 1
        losses.append(total / max(batches, 1))
        if progress is not None:
            progress(epoch, losses[-1])
        held_total, held_batches = 0.0, 0
        for start in range(0, held_rows.shape[0] - config.batch_size + 1, config.batch_size):
            rows = held_rows[start : start + config.batch_size]
            held_total += float(
                held_loss(
                    {name: tf.constant(value[rows]) for name, value in user_inputs.items()},
                    {name: tf.constant(value[rows]) for name, value in item_inputs.items()},
                    tf.constant(item_inputs["item_id"][rows]),
                    tf.constant(item_log_q[rows], dtype=tf.float32),
                )
            )
            held_batches += 1
        if held_batches == 0:
            continue
        current = held_total / held_batches
        if distribution is not None:
            current = float(distribution.sum(np.array([current]))[0]) / distribution.workers
        if current < best_loss:
            best_loss, best_weights, worse = current, _weights(model), 0
        else:
            worse += 1
            if worse >= 2:
                break
    _set_weights(model, best_weights)
    return losses


def detached(model: TwoTower, spec: FeatureSpec) -> TwoTower:
    """The towers rebuilt outside any distribution strategy with `model`'s weights: plain
    variables, which export and serve like a single-process build's."""
    copy = build_two_tower(spec, model.config)
    _set_weights(copy, _weights(model))
    return copy


def _weights(model: TwoTower) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return model.user_model.get_weights(), model.item_model.get_weights()


def _set_weights(model: TwoTower, weights: tuple[list[np.ndarray], list[np.ndarray]]) -> None:
    # The towers share the item id embedding; setting both restores the same saved values.
    model.user_model.set_weights(weights[0])
    model.item_model.set_weights(weights[1])


def embed(model: keras.Model, inputs: Inputs, output: str, batch: int = 4096) -> np.ndarray:
    parts = []
    n = int(next(iter(inputs.values())).shape[0])
    for start in range(0, n, batch):
        chunk = {name: value[start : start + batch] for name, value in inputs.items()}
        parts.append(np.asarray(model(chunk, training=False)[output]))
    result: np.ndarray = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)
    return result


def log_sampling_probability(item_tokens: np.ndarray) -> np.ndarray:
    """log q per row: the share of training rows whose item is the row's item."""
    _, inverse, counts = np.unique(item_tokens, return_inverse=True, return_counts=True)
    log_q: np.ndarray = np.log(counts[inverse] / item_tokens.shape[0]).astype(np.float32)
    return log_q
