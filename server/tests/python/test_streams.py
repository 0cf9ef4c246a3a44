"""ModelStreamInfer through tritonclient's stream API (`start_stream`,
`async_stream_infer`, `stop_stream`), as a Triton user drives it."""

from __future__ import annotations

import queue
import re
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import serve

#: A request with a negative input holds the slow model's only instance this long;
#: others are answered at once.
HOLD_MS = 3000

SLOW_CONFIG = f"""
backend: "sluice_synthetic"
max_batch_size: 1
input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "behavior" value: {{ string_value: "hang" }} }}
parameters {{ key: "hang_ms" value: {{ string_value: "{HOLD_MS}" }} }}
"""


@pytest.fixture(scope="module")
def client(sluice):
    c = grpcclient.InferenceServerClient(sluice.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A server whose repository holds one slow synthetic model."""
    repo = tmp_path_factory.mktemp("slow-repo")
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.pbtxt").write_text(SLOW_CONFIG)
    yield from serve(repository=repo)


def mlp_input(i: int) -> grpcclient.InferInput:
    x = (np.arange(64, dtype=np.float32) * 0.01 + i * 0.001).reshape(1, 64)
    inp = grpcclient.InferInput("INPUT__0", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    return inp


def collect(answers: queue.Queue, n: int, timeout_s: float = 60.0) -> list:
    """`n` (result, error) pairs from the stream's callback, in arrival order."""
    deadline = time.monotonic() + timeout_s
    got = []
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} answers within {timeout_s} s"
        got.append(answers.get(timeout=left))
    return got


def test_a_hundred_requests_on_one_stream_are_answered_with_their_ids(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(100):
            client.async_stream_infer("mlp", [mlp_input(i)], request_id=f"req-{i}")
        got = collect(answers, 100)
    finally:
        client.stop_stream()
    errors = [e for _, e in got if e is not None]
    assert not errors, errors[:3]
    by_id = {r.get_response().id: r.as_numpy("OUTPUT__0") for r, _ in got}
    assert sorted(by_id) == sorted(f"req-{i}" for i in range(100))
    # Each answer is its own request's: the same request sent alone gets the same values
    # (up to float rounding: in a batch the model sums in another order).
    for i in (0, 37, 99):
        alone = client.infer("mlp", [mlp_input(i)]).as_numpy("OUTPUT__0")
        np.testing.assert_allclose(by_id[f"req-{i}"], alone, rtol=1e-5, atol=1e-6)
    # Neighbouring inputs differ by 0.001 per feature: a mixed-up answer would not pass.
    assert not np.allclose(by_id["req-0"], by_id["req-1"], rtol=1e-5, atol=1e-6)


def test_a_bad_request_gets_an_error_in_the_stream_and_the_stream_goes_on(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("mlp", [mlp_input(0)], request_id="good-1")
        bad = grpcclient.InferInput("NO_SUCH_INPUT", [1, 64], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
        client.async_stream_infer("mlp", [bad], request_id="bad")
        client.async_stream_infer("no_such_model", [mlp_input(0)], request_id="unknown")
        client.async_stream_infer("mlp", [mlp_input(1)], request_id="good-2")
        got = collect(answers, 4)
    finally:
        client.stop_stream()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 2, got
    assert all(isinstance(e, InferenceServerException) for e in errors)
    messages = " | ".join(e.message() for e in errors)
    assert "NO_SUCH_INPUT" in messages and "no_such_model" in messages, messages
    ok = sorted(r.get_response().id for r, e in got if e is None)
    assert ok == ["good-1", "good-2"]


def metric(url: str, name: str, labels: str) -> float:
    """One sample of `/metrics` (0 when it is not there yet)."""
    with urllib.request.urlopen(url, timeout=5) as r:
        body = r.read().decode()
    series = f"{name}{{{labels}}}" if labels else name
    pattern = re.compile(rf"^{re.escape(series)} (\S+)$", re.M)
    m = pattern.search(body)
    return float(m.group(1)) if m else 0.0


def wait_for(check, what: str, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_closing_a_stream_drops_its_queued_requests(slow_server):
    url = slow_server.metrics_url
    cancelled = lambda: metric(url, "sluice_dropped_requests_total", 'model="slow",reason="cancelled"')
    executed = lambda: metric(url, "sluice_inferences_total", 'model="slow"')
    in_flight = lambda: metric(url, "sluice_in_flight_requests", "")
    cancelled_before, executed_before = cancelled(), executed()
    queued = 10
    client = grpcclient.InferenceServerClient(slow_server.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))

    def send(value: float, request_id: str) -> None:
        inp = grpcclient.InferInput("INPUT__0", [1, 4], "FP32")
        inp.set_data_from_numpy(np.full((1, 4), value, dtype=np.float32))
        client.async_stream_infer("slow", [inp], request_id=request_id)

    # One request holds the model's only instance; the others wait in its queue.
    send(-1.0, "holding")
    wait_for(lambda: in_flight() == 1, "the holding request admitted")
    for i in range(queued):
        send(1.0, str(i))
    wait_for(lambda: in_flight() == 1 + queued, "the stream's requests admitted")
    client.stop_stream(cancel_requests=True)
    client.close()
    # Every queued request is dropped when the queue reaches it: only the holding one ran.
    dropped = lambda: cancelled() - cancelled_before
    ran = lambda: executed() - executed_before
    wait_for(lambda: dropped() == queued, "every queued request dropped")
    wait_for(lambda: ran() == 1, "the holding request executed")
    wait_for(lambda: in_flight() == 0, "nothing left in flight")
    assert (dropped(), ran()) == (queued, 1)
