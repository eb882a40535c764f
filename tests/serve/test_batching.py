"""Micro-batching: which requests share a policy call, which run alone, and that every request gets its
own answers back. The batcher is driven directly with asyncio (exact call lists), then through the server
with the tiny model (a seeded answer does not depend on other traffic)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from qalign.rollout.base import Completion, SamplingConfig
from qalign.serve.app import build_app
from qalign.serve.batching import MicroBatcher, batch_key
from qalign.serve.errors import ServeError
from tests.serve.conftest import client, hf_policy, running_server


class Recorder:
    """A ``sample`` that answers ``"<prompt>#<j>"`` and records the prompts of each call."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[list[str]] = []
        self.delay = delay
        self.threads: set[int] = set()

    def __call__(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        self.calls.append(list(prompts))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        if any("fail" in p for p in prompts):
            raise ValueError("cannot take " + ",".join(prompts))
        return [[Completion([], [], f"{p}#{j}") for j in range(sampling.n)] for p in prompts]


def run(batcher: MicroBatcher, requests: list[tuple[list[str], SamplingConfig]], stagger: float = 0.0):
    """Submit ``requests`` concurrently (``stagger`` seconds apart); returns each one's texts or error."""

    async def main():
        async def one(i, prompts, sampling):
            await asyncio.sleep(i * stagger)
            groups = await batcher.submit(prompts, sampling)
            return [[c.text for c in group] for group in groups]

        try:
            tasks = [one(i, p, s) for i, (p, s) in enumerate(requests)]
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await batcher.aclose()

    return asyncio.run(main())


PLAIN = SamplingConfig(max_tokens=8)


def test_requests_in_one_window_share_one_call():
    sample = Recorder()
    answers = run(MicroBatcher(sample, window_s=0.2, max_batch_size=32), [([f"p{i}"], PLAIN) for i in range(6)])
    assert sample.calls == [["p0", "p1", "p2", "p3", "p4", "p5"]]
    assert answers == [[[f"p{i}#0"]] for i in range(6)]


def test_max_batch_size_counts_prompts():
    sample = Recorder()
    requests = [
        (["a", "b"], PLAIN),
        (["c"], PLAIN),
        (["d", "e"], PLAIN),
        (["f"], PLAIN),
        (["g", "h", "i", "j", "k"], PLAIN),
    ]
    answers = run(MicroBatcher(sample, window_s=0.2, max_batch_size=4), requests)
    # In arrival order, each call takes what fits in 4; a request bigger than the batch runs alone.
    assert sample.calls == [["a", "b", "c", "f"], ["d", "e"], ["g", "h", "i", "j", "k"]]
    assert answers[0] == [["a#0"], ["b#0"]] and answers[4] == [[f"{x}#0"] for x in "ghijk"]


def test_only_equal_settings_share_a_call():
    sample = Recorder()
    hot, cold, two = SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.5), SamplingConfig(n=2)
    requests = [(["h1"], hot), (["c1"], cold), (["h2"], hot), (["t1"], two), (["c2"], cold), (["t2"], two)]
    answers = run(MicroBatcher(sample, window_s=0.2), requests)
    assert sample.calls == [["h1", "h2"], ["c1", "c2"], ["t1", "t2"]]
    assert answers[3] == [["t1#0", "t1#1"]]
    assert batch_key(hot) == batch_key(SamplingConfig(temperature=1.0)) != batch_key(cold)
    assert batch_key(SamplingConfig(stop=["x"])) != batch_key(SamplingConfig(stop=["y"]))


def test_seeded_requests_run_alone():
    sample = Recorder()
    requests = [(["a"], PLAIN), (["s1"], SamplingConfig(max_tokens=8, seed=1)), (["b"], PLAIN)]
    requests += [(["s2"], SamplingConfig(max_tokens=8, seed=1))]
    run(MicroBatcher(sample, window_s=0.2), requests)
    assert sorted(sample.calls) == [["a", "b"], ["s1"], ["s2"]]
    assert batch_key(SamplingConfig(seed=3)) is None


def test_window_zero_turns_batching_off():
    sample = Recorder(delay=0.05)
    batcher = MicroBatcher(sample, window_s=0.0)
    assert not batcher.batching
    run(batcher, [([f"p{i}"], PLAIN) for i in range(4)])
    assert sample.calls == [["p0"], ["p1"], ["p2"], ["p3"]]


def test_requests_arriving_during_a_call_join_the_next_one():
    sample = Recorder(delay=0.3)
    run(MicroBatcher(sample, window_s=0.001), [([f"p{i}"], PLAIN) for i in range(5)], stagger=0.05)
    assert sample.calls[0] == ["p0"] and sample.calls[1] == ["p1", "p2", "p3", "p4"]
    assert len(sample.threads) == 1, "one worker thread runs the policy"


def test_a_failing_request_fails_alone():
    sample = Recorder()
    answers = run(MicroBatcher(sample, window_s=0.2), [(["a"], PLAIN), (["fail"], PLAIN), (["b"], PLAIN)])
    assert answers[0] == [["a#0"]] and answers[2] == [["b#0"]]
    assert isinstance(answers[1], ValueError) and str(answers[1]) == "cannot take fail"
    assert sample.calls == [["a", "fail", "b"], ["a"], ["fail"], ["b"]]


def test_a_request_whose_client_left_is_skipped():
    sample = Recorder()
    batcher = MicroBatcher(sample, window_s=0.2)

    async def main():
        gone = asyncio.create_task(batcher.submit(["gone"], PLAIN))
        kept = asyncio.create_task(batcher.submit(["kept"], PLAIN))
        await asyncio.sleep(0.05)
        gone.cancel()
        result = await kept
        await batcher.aclose()
        return result

    assert [[c.text for c in g] for g in asyncio.run(main())] == [["kept#0"]]
    assert sample.calls == [["kept"]]


def test_closing_fails_waiting_requests_with_503():
    batcher = MicroBatcher(Recorder(delay=0.2), window_s=0.0)

    async def main():
        first = asyncio.create_task(batcher.submit(["first"], PLAIN))
        waiting = asyncio.create_task(batcher.submit(["waiting"], PLAIN))
        await asyncio.sleep(0.05)  # "first" is running, "waiting" queued
        await batcher.aclose()
        return await asyncio.gather(first, waiting, return_exceptions=True)

    first, waiting = asyncio.run(main())
    assert [[c.text for c in g] for g in first] == [["first#0"]]  # the running call still answers
    assert isinstance(waiting, ServeError) and waiting.status == 503
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), window_s=-1)
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), max_batch_size=0)


def test_server_batches_and_a_seed_is_independent_of_traffic(tiny_model_dir):
    policy = hf_policy(tiny_model_dir)
    app = build_app(policy, "tiny", batch_window_ms=300, max_batch_size=16)
    try:
        with running_server(app) as url:
            api = client(url)
            alone = api.completions.create(model="tiny", prompt="What is 3 + 4?", max_tokens=6, seed=13).choices[0].text

            def request(i: int) -> str:
                if i == 3:
                    return (
                        api.completions.create(model="tiny", prompt="What is 3 + 4?", max_tokens=6, seed=13)
                        .choices[0]
                        .text
                    )
                return api.completions.create(model="tiny", prompt=f"What is {i} + 1?", max_tokens=6).choices[0].text

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                texts = list(pool.map(request, range(8)))
            assert texts[3] == alone
            calls = app.state.batcher.calls
            assert calls[0] == 1 and max(calls[1:]) > 1, calls  # the unseeded ones shared calls
            assert sum(calls[1:]) == 8
    finally:
        policy.close()
