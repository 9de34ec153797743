"""A request's admission keeps its model's counters balanced on every way out."""

from __future__ import annotations

import pytest

from mesh.errors import Overloaded
from node.backends.stats import Admission, ModelStats


def counters(s: ModelStats) -> tuple[int, int, int]:
    return (s.waiting, s.running, s.queued_prefill_tokens)


def test_every_way_out_balances() -> None:
    s = ModelStats()
    with Admission(s, 4) as a:  # finished normally
        a.queue_prefill(100)
        assert counters(s) == (1, 0, 100)
        a.run()
        assert counters(s) == (0, 1, 100)
        a.prefilled()
        assert counters(s) == (0, 1, 0)
    assert counters(s) == (0, 0, 0)
    with pytest.raises(RuntimeError), Admission(s, 4) as a:  # failed while waiting
        a.queue_prefill(50)
        raise RuntimeError
    assert counters(s) == (0, 0, 0)
    a = Admission(s, 4)  # cancelled while running, before its first token
    a.queue_prefill(30)
    a.run()
    a.close()
    a.close()  # idempotent
    assert counters(s) == (0, 0, 0)


def test_a_full_queue_refuses_and_counts_nothing() -> None:
    s = ModelStats()
    first = Admission(s, 1)
    with pytest.raises(Overloaded, match="1 requests already waiting"):
        Admission(s, 1)
    assert s.waiting == 1
    first.close()
    assert s.to_load("m").waiting == 0
