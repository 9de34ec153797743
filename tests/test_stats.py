"""A request's admission keeps its model's counters balanced on every way out; the
aggregate decode meter."""

from __future__ import annotations

import threading

import pytest

from mesh.errors import Overloaded
from node.backends.stats import Admission, DecodeMeter, ModelStats


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


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_meter_reads_tokens_per_second_over_its_window() -> None:
    clock = Clock()
    m = DecodeMeter(window_s=2.0, clock=clock)
    assert m.rate() == 0.0  # nothing counted: not measured
    m.count(3)
    assert m.rate() == 0.0  # one count has no span yet
    clock.now += 0.05
    m.count(3)
    assert m.rate() == 0.0  # too short a span to tell
    for _ in range(9):  # a batch of 3 streams, a step every 50 ms: 60 tok/s
        clock.now += 0.05
        m.count(3)
    assert m.rate() == pytest.approx(60.0)
    clock.now += 0.03  # between steps the reading holds
    assert m.rate() == pytest.approx(60.0)
    for _ in range(250):  # one stream left, a step every 10 ms: 100 tok/s
        clock.now += 0.01
        m.count(1)
    assert m.rate() == pytest.approx(100.0, rel=0.02)  # the window holds only the new rate
    m.count(0)  # nothing decoded: no count
    clock.now += 2.5  # nothing decoded for longer than the window
    assert m.rate() == 0.0


def test_an_idle_gap_does_not_dilute_the_next_reading() -> None:
    clock = Clock()
    m = DecodeMeter(window_s=2.0, clock=clock)
    for _ in range(5):  # a short answer at 100 tok/s, then the batch empties
        m.count(1)
        clock.now += 0.01
    m.idle()
    assert m.rate() == 0.0
    clock.now += 0.5  # idle half a second, then 2 streams at 40 tok/s together
    for _ in range(20):
        m.count(2)
        clock.now += 0.05
    assert m.rate() == pytest.approx(40.0)


def test_the_meter_counts_from_any_thread() -> None:
    clock = Clock()
    m = DecodeMeter(window_s=10.0, clock=clock)
    m.count(1)
    clock.now += 1.0

    def count() -> None:
        for _ in range(1000):
            m.count(2)

    threads = [threading.Thread(target=count) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.rate() == pytest.approx(8000.0)  # 4 x 1000 x 2 tokens over 1 s


def test_the_load_reports_the_aggregate() -> None:
    s = ModelStats(meter=DecodeMeter(clock=(clock := Clock())))
    assert s.to_load("m").aggregate_decode_tokens_per_second == 0.0
    a = Admission(s, 4)
    a.run()
    s.count_decoded(4)
    clock.now += 0.5
    s.count_decoded(4)
    assert s.aggregate_decode_tps == pytest.approx(8.0)
    assert s.to_load("m").aggregate_decode_tokens_per_second == pytest.approx(8.0)
    assert s.to_load("m").decode_tokens_per_second == 0.0  # the per-stream EMA is separate
    a.close()  # the last running request left: the batch is empty
    assert s.to_load("m").aggregate_decode_tokens_per_second == 0.0
