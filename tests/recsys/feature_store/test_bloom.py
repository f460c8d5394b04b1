"""Bloom filters: sizing formulas, measured false-positive rate, bit layout, time slices."""

from __future__ import annotations

import math

import numpy as np
import pytest
from redis.asyncio import Redis

from recsys.feature_store import (
    BloomFilter,
    BloomParameters,
    ExposureFilterConfig,
    InProcessFeatureStore,
    LiveDataPolicy,
)
from recsys.feature_store.bloom import bit_positions, optimal_bits, optimal_hashes
from recsys.feature_store.redis_store import RedisFeatureStore
from tests.recsys.feature_store import REDIS_URL, delete_prefix, unique_prefix

DAY = 86_400


# --- sizing --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("capacity", "error_rate", "bits", "hashes"),
    [
        # m = ⌈n·ln(1/δ)/(ln 2)²⌉, k = round(m/n·ln 2), worked out by hand:
        (1_000, 0.01, 9_586, 7),  # 1000 · 4.60517 / 0.480453 = 9585.06
        (1_000_000, 0.001, 14_377_588, 10),  # 1e6 · 6.90776 / 0.480453 = 14 377 587.6
        (100, 0.5, 145, 1),  # 100 · 0.693147 / 0.480453 = 144.27
    ],
)
def test_optimal_sizing_on_known_values(capacity: int, error_rate: float, bits: int, hashes: int) -> None:
    assert optimal_bits(capacity, error_rate) == bits
    assert optimal_hashes(bits, capacity) == hashes
    parameters = BloomParameters.optimal(capacity, error_rate)
    assert parameters.bits == math.ceil(bits / 8) * 8
    assert parameters.hashes == hashes


@pytest.mark.parametrize("error_rate", [0.1, 0.01, 0.001, 1e-6])
def test_sizing_matches_the_issues_approximations(error_rate: float) -> None:
    capacity = 10_000
    bits = optimal_bits(capacity, error_rate)
    # k ≈ 1.44·ln(1/δ) (= log2(1/δ)); m ≈ 2.08·n·ln(1/δ), about 4% above the issue's 2·n·ln(1/δ).
    assert abs(optimal_hashes(bits, capacity) - 1.44 * math.log(1 / error_rate)) <= 1
    assert bits / (capacity * math.log(1 / error_rate)) == pytest.approx(2.08, abs=0.01)


@pytest.mark.parametrize(("capacity", "error_rate"), [(0, 0.01), (10, 0.0), (10, 1.0), (10, -0.5)])
def test_sizing_refuses_nonsense(capacity: int, error_rate: float) -> None:
    with pytest.raises(ValueError, match=r"capacity|error_rate"):
        optimal_bits(capacity, error_rate)


# --- behaviour ------------------------------------------------------------------------------
def test_measured_false_positive_rate_is_within_twice_the_target() -> None:
    target = 0.01
    bloom = BloomFilter.for_capacity(100_000, target)
    inserted = [f"item-{index}" for index in range(100_000)]
    bloom.add_many(inserted)
    assert bloom.contains_many(inserted).all()  # no false negatives, ever
    measured = float(bloom.contains_many([f"absent-{index}" for index in range(200_000)]).mean())
    assert target / 2 <= measured <= 2 * target, measured
    assert bloom.fill_ratio() == pytest.approx(0.5, abs=0.03)  # optimally sized: half the bits set


def test_positions_are_stable_and_within_the_filter() -> None:
    positions = bit_positions(["a", "b", "é"], bits=1_024, hashes=5)
    assert positions.shape == (3, 5)
    assert positions.dtype == np.int64
    assert ((positions >= 0) & (positions < 1_024)).all()
    # xxh3_128 with seed 0: filters written by another process (or release) stay readable.
    np.testing.assert_array_equal(positions, bit_positions(["a", "b", "é"], bits=1_024, hashes=5))
    assert len(set(positions[0].tolist())) > 1
    assert bit_positions([], bits=1_024, hashes=5).shape == (0, 5)


def test_bytes_round_trip() -> None:
    bloom = BloomFilter.for_capacity(1_000, 0.01)
    bloom.add_many(["x", "y"])
    data = bloom.to_bytes()
    assert len(data) == bloom.bits // 8 == 9_592 // 8
    copy = BloomFilter.from_bytes(data, bloom.hashes)
    assert copy.contains_many(["x", "y"]).all()
    copy.add_many(["z"])
    assert not bloom.contains_many(["z"]).any()  # from_bytes copies
    with pytest.raises(ValueError, match="data"):
        BloomFilter(bloom.bits, bloom.hashes, data[:-1])


async def test_bit_order_is_the_one_redis_uses() -> None:
    bloom = BloomFilter(64, 3)
    bloom.add_many(["item"])
    key = f"{unique_prefix()}:bits"
    client = Redis.from_url(REDIS_URL)
    try:
        await client.set(key, bloom.to_bytes())
        bits = [await client.getbit(key, position) for position in range(64)]
    finally:
        await client.delete(key)
        await client.aclose()
    assert {position for position, bit in enumerate(bits) if bit} == set(
        bloom.positions(["item"])[0].tolist()
    )


# --- time slices ---------------------------------------------------------------------------------
def test_slices_window_and_expiry() -> None:
    exposures = ExposureFilterConfig(slice_seconds=DAY, slices=7)
    now = 100 * DAY + 3_600
    assert exposures.slice_of(now) == 100
    assert list(exposures.window(now)) == [94, 95, 96, 97, 98, 99, 100]
    assert exposures.expires_at(100) == 108 * DAY  # N + 1 slices after it began
    assert exposures.ttl_seconds(100, now) == 8 * DAY - 3_600
    assert exposures.ttl_seconds(50, now) == 1  # already past: the shortest TTL Redis takes
    assert not exposures.is_expired(93, now)  # outside the window but within its margin
    assert exposures.is_expired(92, now)


def test_snapshot_skips_slices_of_another_size() -> None:
    exposures = ExposureFilterConfig(capacity=100)
    current = exposures.new_slice()
    current.add_many(["a"])
    other = BloomFilter(current.bits + 8, current.hashes)
    other.add_many(["a", "b"])
    snapshot = exposures.snapshot([None, other.to_bytes(), current.to_bytes()])
    assert snapshot.slice_count == 1
    assert snapshot.contains(["a", "b"]).tolist() == [True, False]
    assert exposures.snapshot([None, None]).contains(["a"]).tolist() == [False]


async def test_in_process_store_drops_slices_older_than_the_window() -> None:
    store = InProcessFeatureStore(policy=LiveDataPolicy(exposures=ExposureFilterConfig(slices=7)))
    start = 1_000 * DAY
    for day in range(12):
        await store.record_exposures("alice", [f"day-{day}"], start + day * DAY)
    kept = sorted(store._exposures["alice"])
    # At day 11 (slice 1011) the window is 1005-1011; slice 1004 waits out its margin.
    assert kept == list(range(1_004, 1_012))
    state = await store.user_state("v1", "alice", now=start + 11 * DAY)
    assert state.exposure_filter is not None
    seen = state.exposure_filter.contains([f"day-{day}" for day in range(12)])
    assert seen.tolist() == [False] * 5 + [True] * 7


async def test_redis_slices_expire_by_themselves() -> None:
    prefix = unique_prefix()
    policy = LiveDataPolicy(exposures=ExposureFilterConfig(slice_seconds=DAY, slices=7))
    store = RedisFeatureStore(REDIS_URL, prefix, policy=policy, write_timeout=1.0)
    now = 1_000 * DAY + 600
    client = Redis.from_url(REDIS_URL)
    try:
        await store.record_exposures("alice", ["a", "b"], now)
        key = store.keys.seen("alice", 1_000)
        assert await client.strlen(key) == policy.exposures.slice_bytes
        ttl = await client.ttl(key)
        assert 8 * DAY - 600 - 5 <= ttl <= 8 * DAY - 600
    finally:
        await client.aclose()
        await store.close()
        await delete_prefix(prefix)
