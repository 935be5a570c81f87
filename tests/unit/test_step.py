"""The reconcile step value (controller/step.py): what a handler asks for next, and how several merge."""

from __future__ import annotations

from controller.step import AGAIN, DONE, MIN_REQUEUE, merge, requeue


def test_done_again_and_requeue_say_what_they_are():
    assert DONE.done and not DONE.again and not DONE.requeues
    assert AGAIN.again and not AGAIN.done and not AGAIN.requeues
    step = requeue(2.5, "crash backoff")
    assert step.requeues and not step.done and step.after == 2.5 and step.reason == "crash backoff"


def test_a_requeue_is_never_a_busy_loop():
    assert requeue(0, "now").after == MIN_REQUEUE
    assert requeue(-3, "in the past").after == MIN_REQUEUE


def test_the_earliest_requeue_wins():
    late, early = requeue(30, "resync"), requeue(0.5, "turn poll")
    assert merge(late, early) == early
    assert merge(early, late) == early
    assert merge(late, DONE, early, DONE) == early


def test_a_requeue_wins_over_done_and_done_alone_is_done():
    assert merge(DONE, requeue(5, "refused")) == requeue(5, "refused")
    assert merge() == DONE
    assert merge(DONE, DONE) == DONE


def test_again_now_keeps_the_earliest_requeue_of_the_same_sync():
    """A crash recorded with its backoff plans again at once, and its wake-up is not lost: one requeue
    (the earliest) for the whole sync, where there were two."""
    crash = requeue(4, "restart backoff", again=True)
    assert crash.again and crash.requeues and not crash.done
    merged = merge(crash, AGAIN, requeue(10, "wait"))
    assert merged.again and merged.after == 4 and merged.reason == "restart backoff"
    assert merge(AGAIN, DONE) == AGAIN
