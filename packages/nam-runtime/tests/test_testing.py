"""nam_runtime.testing.run_ranks: results in rank order, per-rank environment, failures and hangs."""

from __future__ import annotations

import os
import time

import pytest

from nam_runtime.testing import RankFailure, run_ranks


def _environment(tag: str) -> tuple[str, ...]:
    env = os.environ
    return (
        tag,
        env["RANK"],
        env["WORLD_SIZE"],
        env["LOCAL_RANK"],
        env["MASTER_PORT"],
        env["OMP_NUM_THREADS"],
    )


def _fail_on_rank_one() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("rank one went wrong")


def _hang_on_rank_one() -> None:
    if os.environ["RANK"] == "1":
        time.sleep(600)


def test_results_come_back_in_rank_order_with_rank_environment() -> None:
    first = run_ranks(_environment, 2, "x")
    second = run_ranks(_environment, 2, tag="y")
    assert [row[:4] for row in first] == [("x", "0", "2", "0"), ("x", "1", "2", "1")]
    assert [row[0] for row in second] == ["y", "y"]
    assert {row[5] for row in first + second} == {"1"}
    assert first[0][4] == first[1][4]  # one rendezvous port per call
    assert "RANK" not in os.environ or os.environ["RANK"] != "1"  # the caller's environment is restored


def test_failing_rank_traceback_is_in_the_report() -> None:
    with pytest.raises(RankFailure, match=r"(?s)rank 1 of 2 raised:.*ValueError: rank one went wrong"):
        run_ranks(_fail_on_rank_one, 2)


def test_hung_rank_fails_after_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"ranks \[1\] of 2 did not finish within 20 s"):
        run_ranks(_hang_on_rank_one, 2, timeout_s=20)
    assert time.monotonic() - start < 40


def test_rejects_an_empty_world() -> None:
    with pytest.raises(ValueError, match="world_size=0"):
        run_ranks(_environment, 0, "x")
