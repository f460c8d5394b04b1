"""RankClient's mapping of rank's answer back onto the candidates it was sent."""

from __future__ import annotations

import numpy as np
import pytest

from services.gateway.clients import _positions
from services.gateway.downstream import DownstreamError


def test_returned_items_are_found_among_the_sent_ones_in_the_answers_order() -> None:
    sent = np.array([40, 7, 19, 3, 25], np.int32)
    returned = np.array([7, 3, 25], np.int32)  # pre-rank kept three, in the call's order
    positions = _positions(sent, returned)
    assert positions.tolist() == [1, 3, 4]
    assert sent[positions].tolist() == returned.tolist()
    assert _positions(sent, np.zeros(0, np.int32)).tolist() == []


@pytest.mark.parametrize(
    ("sent", "returned"),
    [
        ([40, 7, 19], [7, 8]),  # 8 was never sent
        ([40, 7, 19], [41]),  # past the largest sent
        ([], [1]),  # nothing sent at all
    ],
)
def test_an_item_rank_was_not_sent_fails_the_call_as_a_downstream_error(
    sent: list[int], returned: list[int]
) -> None:
    with pytest.raises(DownstreamError) as raised:
        _positions(np.array(sent, np.int32), np.array(returned, np.int32))
    assert raised.value.reason == "unsent items"
