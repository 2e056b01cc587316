"""The worker's side of cancellation (handler/cancellation.py) against a real Redis: a job canceled in the
store stops at its next iteration; without Redis, or with a Redis that fails, requests run as before."""

import socket
import time

import redis

from cancellation import CANCEL_KEY_PREFIX, POLL_INTERVAL, REDIS_TIMEOUT, CancelSignals, job_key


def test_the_job_key_comes_from_the_header_in_any_case_and_only_in_the_ids_alphabet():
    assert job_key({"X-Style-Job-Id": "a1.1"}) == "a1.1" and job_key({"x-style-job-id": "b_2:3"}) == "b_2:3"
    assert job_key({"X-Style-Job-Id": "a b"}) is None and job_key({"X-Style-Job-Id": "x" * 101}) is None
    assert job_key({"Content-Type": "text/plain"}) is None and job_key({"content": {"content-type": ""}}) is None


def test_without_a_redis_url_or_a_job_nothing_is_watched(redis_server):
    assert CancelSignals(None).watch(["job.1"]) is None
    assert CancelSignals(redis_server.url).watch([None, None]) is None


def test_a_cancel_set_in_redis_is_seen_by_the_next_poll(redis_server):
    store = redis.Redis.from_url(redis_server.url)
    should_stop = CancelSignals(redis_server.url).watch(["seen.1", None, "other.1"])
    assert should_stop(0) is False and should_stop(1) is False and should_stop(2) is False
    store.set(CANCEL_KEY_PREFIX + "seen.1", "1", ex=60)
    time.sleep(POLL_INTERVAL)
    assert should_stop(0) is True and should_stop(2) is False
    store.set(CANCEL_KEY_PREFIX + "other.1", "1", ex=60)
    assert should_stop(2) is False  # not polled again before POLL_INTERVAL has passed: iterations stay cheap
    time.sleep(POLL_INTERVAL)
    assert should_stop(2) is True and should_stop(0) is True


def test_a_redis_that_does_not_answer_neither_stops_nor_slows_the_work():
    """A store that accepts connections and never answers costs one REDIS_TIMEOUT, then is left alone for
    RETRY_AFTER_ERROR: iterations spread over a second spend well under two timeouts in should_stop."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # never accepted: connects succeed (backlog), reads time out
        should_stop = CancelSignals(f"redis://127.0.0.1:{silent.getsockname()[1]}/0").watch(["lost.1"])
        spent, answers = 0.0, []
        for _ in range(20):
            start = time.monotonic()
            answers.append(should_stop(0))
            spent += time.monotonic() - start
            time.sleep(0.05)
    assert answers == [False] * 20 and spent < 1.8 * REDIS_TIMEOUT
