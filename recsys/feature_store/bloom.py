"""Bloom filters for exposures ("was this item shown to this user lately?"), sliced by time.

Sizing. A Bloom filter of m bits and k hash functions holding n items answers "present" for
an absent item with probability p ≈ (1 − e^(−kn/m))^k. For a given m/n this is smallest at
k = (m/n)·ln 2, where half the bits are set and p = 2^(−k). Asking for p = δ then gives the
standard optimum used here:

    m = ⌈n·ln(1/δ) / (ln 2)²⌉ ≈ 2.08·n·ln(1/δ)        (`optimal_bits`, then rounded up to whole bytes)
    k = round((m/n)·ln 2) = log2(1/δ) ≈ 1.44·ln(1/δ)  (`optimal_hashes`)

The issue's k = 1.44·ln(1/δ) is the same formula (1/ln 2 = 1.4427). Its m = 2·n·ln(1/δ) rounds
1/(ln 2)² = 2.081 down to 2, which is about 4% fewer bits: with the optimal k the rate becomes
δ^(2·(ln 2)²) = δ^0.961 (1.2% instead of 1% at δ = 0.01), so we keep the exact constant.

Hashing. Each item id (UTF-8) is hashed once with xxh3_128 (seed 0: stable across processes,
machines and releases, which matters because filters outlive the process that wrote them in
Redis). Its two 64-bit halves h1, h2 give the k positions h1 + i·h2 mod m (Kirsch and
Mitzenmacher 2006: double hashing keeps the asymptotic false-positive rate of k independent
hashes). The per-item work after the hash is vectorised with numpy.

Bit order is Redis's (SETBIT/BITFIELD): bit j is in byte j // 8, most significant bit first,
so a filter's bytes are the same in memory and in a Redis string.

Forgetting. A Bloom filter cannot delete, so exposures are kept in one filter per time slice
(a day by default); a read consults the last N slices (7 by default) and a slice expires
N + 1 slices after it began (the extra slice is a margin for clock skew between writers).
A slice filled beyond its capacity still works, with a higher false-positive rate; with N
slices all at capacity the chance that an unseen item is filtered is about N·δ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt
import xxhash

BoolArray = npt.NDArray[np.bool_]
PositionArray = npt.NDArray[np.int64]

_LN2 = math.log(2.0)


def optimal_bits(capacity: int, error_rate: float) -> int:
    """m = ⌈n·ln(1/δ)/(ln 2)²⌉: the fewest bits that hold `capacity` items at `error_rate`."""
    _check_sizing(capacity, error_rate)
    return math.ceil(capacity * math.log(1.0 / error_rate) / (_LN2 * _LN2))


def optimal_hashes(bits: int, capacity: int) -> int:
    """k = round((m/n)·ln 2), at least 1: the number of hash functions that minimises the
    false-positive rate of `bits` bits holding `capacity` items."""
    if bits < 1:
        raise ValueError(f"bits: expected at least 1, got {bits}")
    _check_sizing(capacity, 0.5)
    return max(1, round(bits / capacity * _LN2))


def item_digests(item_ids: Sequence[str]) -> npt.NDArray[np.uint64]:
    """The xxh3_128 digest of each item id as two uint64 halves, [len(item_ids), 2]. Servers
    compute them once per catalogue (a digest does not depend on the filter's size)."""
    if len(item_ids) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    digests = b"".join([xxhash.xxh3_128_digest(item.encode("utf-8")) for item in item_ids])
    return np.frombuffer(digests, dtype=">u8").reshape(-1, 2).astype(np.uint64)


def bit_positions(item_ids: Sequence[str], bits: int, hashes: int) -> PositionArray:
    """The `hashes` bit positions of each item id, as an int64 array [len(item_ids), hashes]."""
    return positions_from_digests(item_digests(item_ids), bits, hashes)


def positions_from_digests(halves: npt.NDArray[np.uint64], bits: int, hashes: int) -> PositionArray:
    if bits < 2:
        raise ValueError(f"bits: expected at least 2, got {bits}")
    if halves.shape[0] == 0:
        return np.zeros((0, hashes), dtype=np.int64)
    size = np.uint64(bits)
    first = halves[:, 1] % size
    # In [1, m): a zero step would put all k positions on one bit.
    step = halves[:, 0] % np.uint64(bits - 1) + np.uint64(1)
    rounds = np.arange(hashes, dtype=np.uint64)
    # Both terms are below k·m, far from overflowing 64 bits for any filter Redis can hold.
    positions = (first[:, None] + rounds[None, :] * step[:, None]) % size
    return positions.astype(np.int64)


def _masks(positions: PositionArray) -> tuple[PositionArray, npt.NDArray[np.uint8]]:
    """Byte index and bit mask of each position (most significant bit first, as Redis)."""
    return positions >> 3, (np.uint8(0x80) >> (positions & 7).astype(np.uint8)).astype(np.uint8)


class BloomFilter:
    """A Bloom filter over `bits` bits (a whole number of bytes) with `hashes` hash functions."""

    def __init__(self, bits: int, hashes: int, data: bytes | bytearray | None = None) -> None:
        if bits < 8 or bits % 8:
            raise ValueError(f"bits: expected a positive multiple of 8, got {bits}")
        if hashes < 1:
            raise ValueError(f"hashes: expected at least 1, got {hashes}")
        self.bits = bits
        self.hashes = hashes
        if data is None:
            self._array = np.zeros(bits // 8, dtype=np.uint8)
        else:
            if len(data) != bits // 8:
                raise ValueError(f"data: expected {bits // 8} bytes for {bits} bits, got {len(data)}")
            self._array = np.frombuffer(data, dtype=np.uint8).copy()

    @classmethod
    def for_capacity(cls, capacity: int, error_rate: float) -> BloomFilter:
        parameters = BloomParameters.optimal(capacity, error_rate)
        return cls(parameters.bits, parameters.hashes)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray, hashes: int) -> BloomFilter:
        return cls(len(data) * 8, hashes, data)

    def to_bytes(self) -> bytes:
        return self._array.tobytes()

    def __repr__(self) -> str:
        return f"BloomFilter(bits={self.bits}, hashes={self.hashes}, fill={self.fill_ratio():.3f})"

    def positions(self, item_ids: Sequence[str]) -> PositionArray:
        return bit_positions(item_ids, self.bits, self.hashes)

    def add_many(self, item_ids: Sequence[str]) -> None:
        self.add_positions(self.positions(item_ids))

    def add_positions(self, positions: PositionArray) -> None:
        byte_index, mask = _masks(positions.reshape(-1))
        np.bitwise_or.at(self._array, byte_index, mask)

    def contains_many(self, item_ids: Sequence[str]) -> BoolArray:
        """Whether each item may have been added (never False for an added item)."""
        return self.contains_positions(self.positions(item_ids))

    def contains_positions(self, positions: PositionArray) -> BoolArray:
        byte_index, mask = _masks(positions)
        return np.asarray((self._array[byte_index] & mask).all(axis=1), dtype=np.bool_)

    def fill_ratio(self) -> float:
        """The share of bits set (0.5 at capacity when sized optimally)."""
        return float(np.unpackbits(self._array).mean())


@dataclass(frozen=True)
class BloomParameters:
    capacity: int
    error_rate: float
    bits: int  # optimal_bits rounded up to whole bytes
    hashes: int

    @classmethod
    def optimal(cls, capacity: int, error_rate: float) -> BloomParameters:
        exact = optimal_bits(capacity, error_rate)
        return cls(capacity, error_rate, bits=-(-exact // 8) * 8, hashes=optimal_hashes(exact, capacity))


@dataclass(frozen=True, eq=False)
class ExposureSnapshot:
    """The exposure slices of one user read at one moment: `slices` is [n_slices, bytes]
    (only the slices that exist). Answers for many items at once."""

    bits: int
    hashes: int
    slices: npt.NDArray[np.uint8] = field(repr=False)

    @property
    def slice_count(self) -> int:
        return int(self.slices.shape[0])

    def contains(self, item_ids: Sequence[str]) -> BoolArray:
        """Whether each external item id may have been shown in the window read (no false
        negatives; false positives at about the filter's error rate per slice)."""
        return self.contains_digests(item_digests(item_ids))

    def contains_digests(self, digests: npt.NDArray[np.uint64]) -> BoolArray:
        """`contains` for items given by their precomputed `item_digests`."""
        if self.slice_count == 0 or digests.shape[0] == 0:
            return np.zeros(digests.shape[0], dtype=np.bool_)
        byte_index, mask = _masks(positions_from_digests(digests, self.bits, self.hashes))
        # [slices, items, hashes]: present in a slice = all k bits set there; shown = in any slice.
        hits = (self.slices[:, byte_index] & mask) != 0
        return np.asarray(hits.all(axis=2).any(axis=0), dtype=np.bool_)


@dataclass(frozen=True)
class ExposureFilterConfig:
    """How exposures are remembered: one Bloom filter per `slice_seconds` of unix time sized
    for `capacity` items at `error_rate`, of which the last `slices` are read.

    Changing `capacity` or `error_rate` changes the filters' size; slices of another size are
    ignored when read (they expire by themselves), so the exposure memory starts afresh."""

    capacity: int = 500
    error_rate: float = 0.01
    slice_seconds: int = 86_400
    slices: int = 7

    def __post_init__(self) -> None:
        _check_sizing(self.capacity, self.error_rate)
        if self.slice_seconds < 1:
            raise ValueError(f"slice_seconds: expected at least 1, got {self.slice_seconds}")
        if self.slices < 1:
            raise ValueError(f"slices: expected at least 1, got {self.slices}")

    @cached_property
    def parameters(self) -> BloomParameters:
        return BloomParameters.optimal(self.capacity, self.error_rate)

    @property
    def bits(self) -> int:
        return self.parameters.bits

    @property
    def hashes(self) -> int:
        return self.parameters.hashes

    @property
    def slice_bytes(self) -> int:
        return self.parameters.bits // 8

    def slice_of(self, time: float) -> int:
        """The slice a unix time falls in."""
        return math.floor(time / self.slice_seconds)

    def window(self, now: float) -> range:
        """The slices a read at `now` consults, oldest first (the current one last)."""
        current = self.slice_of(now)
        return range(current - self.slices + 1, current + 1)

    def expires_at(self, slice_id: int) -> float:
        """When a slice stops being kept: N + 1 slices after it began."""
        return float((slice_id + self.slices + 1) * self.slice_seconds)

    def ttl_seconds(self, slice_id: int, now: float) -> int:
        """The time to live to give a slice written at `now` (at least 1 s)."""
        return max(1, math.ceil(self.expires_at(slice_id) - now))

    def is_expired(self, slice_id: int, now: float) -> bool:
        return now >= self.expires_at(slice_id)

    def new_slice(self) -> BloomFilter:
        return BloomFilter(self.bits, self.hashes)

    def positions(self, item_ids: Sequence[str]) -> PositionArray:
        return bit_positions(item_ids, self.bits, self.hashes)

    def snapshot(self, slices: Sequence[bytes | bytearray | None]) -> ExposureSnapshot:
        """An ExposureSnapshot of the slices read (None: the slice does not exist; a slice of
        the wrong size was written with other parameters and is skipped)."""
        present = [data for data in slices if data is not None and len(data) == self.slice_bytes]
        if present:
            stacked = np.frombuffer(b"".join(present), dtype=np.uint8).reshape(len(present), -1)
        else:
            stacked = np.zeros((0, self.slice_bytes), dtype=np.uint8)
        return ExposureSnapshot(self.bits, self.hashes, stacked)


def _check_sizing(capacity: int, error_rate: float) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity: expected a whole number >= 1, got {capacity!r}")
    if not 0.0 < error_rate < 1.0:
        raise ValueError(f"error_rate: expected a probability strictly between 0 and 1, got {error_rate!r}")
