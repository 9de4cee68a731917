"""runtime/labels.py page_in_order: the lazy page List reads from the daemon's ordered index
gives exactly what the sorting page() gives, and reads no further than one past the page."""

from __future__ import annotations

import random

import pytest

from corral.runtime.labels import page, page_in_order


class CountingIterable:
    """An ordered sequence that records how many of its items were read."""

    def __init__(self, items: list[int]):
        self.items = items
        self.read = 0

    def __iter__(self):
        for item in self.items:
            self.read += 1
            yield item


@pytest.mark.parametrize("seed", range(20))
def test_page_in_order_equals_sorting_page(seed):
    rng = random.Random(seed)
    seqs = sorted(rng.sample(range(1, 400), rng.randint(0, 150)))
    for size in (1, 2, 7, 100, 1000):
        after = 0
        while True:
            expected = page(list(reversed(seqs)), after, size, int)  # the oracle sorts
            assert page_in_order(iter(seqs), after, size, int) == expected
            chosen, last = expected
            if last is None:
                break
            after = last
        after = rng.choice(seqs) if seqs else 0  # any position, not just a page boundary
        assert page_in_order(seqs, after, size, int) == page(seqs, after, size, int)


def test_first_page_reads_one_past_the_page_not_the_listing():
    items = CountingIterable(list(range(1, 5001)))
    chosen, last = page_in_order(items, 0, 100, int)
    assert chosen == list(range(1, 101)) and last == 100
    assert items.read == 101


def test_last_page_has_no_continuation():
    assert page_in_order([1, 2, 3], 1, 2, int) == ([2, 3], None)
    assert page_in_order([1, 2, 3], 3, 2, int) == ([], None)
    assert page_in_order([], 0, 100, int) == ([], None)
