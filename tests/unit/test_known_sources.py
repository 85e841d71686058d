"""The insight's known sources: sorted keys with first- and last-seen times,
capped to the most recently seen."""

from __future__ import annotations

import numpy as np

from tidegate.observation.reading import KnownSources
from tidegate.observation.window import source_keys


def halves(numbers) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(len(numbers), np.uint64), np.array(numbers, np.uint64) << np.uint64(32)


def test_known_sources_keep_first_and_last_seen_and_forget_the_least_recent_over_the_cap():
    known = KnownSources(max_known=5)
    known.update(*halves([1, 2, 3]), now=10.0)
    known.update(*halves([3, 4, 2]), now=20.0)
    assert np.all(np.diff(known.keys.astype(np.float64)) > 0) and len(known) == 4
    first = known.first_seen(*halves([1, 2, 3, 4, 9]))
    assert first.tolist() == [10.0, 10.0, 10.0, 20.0, np.inf]
    last = dict(zip(known.keys.tolist(), known.last.tolist()))
    assert [last[int(k)] for k in source_keys(*halves([1, 2, 3, 4]))] == [10.0, 20.0, 20.0, 20.0]
    # three more: seven against a cap of five, the two least recently seen go: 1 (last
    # seen at 10) and one of 2, 3, 4 (at 20); the new ones (at 30) stay
    known.update(*halves([5, 6, 7]), now=30.0)
    assert len(known) == 5
    left = known.first_seen(*halves([1, 2, 3, 4, 5, 6, 7]))
    assert left[0] == np.inf  # 1: the only source last seen at 10
    assert int(np.isinf(left[1:4]).sum()) == 1  # one of 2, 3, 4 (last seen at 20)
    assert left[4:].tolist() == [30.0, 30.0, 30.0]
