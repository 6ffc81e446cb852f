"""The sandbox faults the tests set: those the state machines draw from (none, 5xx answers, dropped connections
before and after StopChurn applied the request, HTML pages answered with 200, and a body limit that makes StopChurn
answer 413), and a fault seed that fails a chosen request."""

from __future__ import annotations

import itertools
import random

from hypothesis import strategies as st

from airflow_provider_stopchurn.sandbox import FaultConfig


def fault_configs(*, html_ok: bool = True, body_limits: tuple[int, ...] = ()) -> st.SearchStrategy[FaultConfig]:
    """One :class:`FaultConfig` a rule sets on the sandbox.

    :param html_ok: whether an HTML page answered with 200 is among the faults.
    :param body_limits: request body limits (bytes) to draw from; none: no body limit among the faults.
    """
    seed = st.integers(0, 1000)
    choices = [
        st.just(FaultConfig()),
        st.builds(FaultConfig, seed=seed, error_rate=st.sampled_from([0.2, 0.5])),
        st.builds(FaultConfig, seed=seed, drop_rate=st.just(0.3)),
        st.builds(FaultConfig, seed=seed, drop_after_apply_rate=st.sampled_from([0.3, 0.6])),
    ]
    if html_ok:
        choices.append(st.builds(FaultConfig, seed=seed, html_ok_rate=st.just(0.4)))
    if body_limits:
        choices.append(st.builds(FaultConfig, max_body_bytes=st.sampled_from(list(body_limits))))
    return st.one_of(*choices)


def seed_failing_third_request(error_rate: float) -> int:
    """A sandbox fault seed under which requests 1-2 succeed and requests 3-4 get a 500 (one draw each).

    :param error_rate: the ``error_rate`` the sandbox's :class:`FaultConfig` gets with this seed.
    """
    for seed in itertools.count():
        rng = random.Random(seed)
        if [rng.random() < error_rate for _ in range(4)] == [False, False, True, True]:
            return seed
    raise AssertionError("unreachable")
