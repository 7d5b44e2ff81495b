"""Suite-wide checks: nothing in the test process reaches CUDA, and, when the whole suite runs,
every listed CPU patch was hit at least once (counts from spawned ranks are merged in by
nam_runtime.testing.run_ranks)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from nam_runtime import cpu

_deselected = False


@pytest.fixture(autouse=True)
def _no_cuda() -> Iterator[None]:
    yield
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized(), "the test initialised CUDA on a machine without it"


def pytest_deselected(items: list[pytest.Item]) -> None:
    global _deselected
    _deselected = _deselected or bool(items)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Only a run of the whole suite (no paths, -k or -m) can vouch for every patch.
    config = session.config
    whole = config.args_source == pytest.Config.ArgsSource.TESTPATHS and not _deselected
    if not whole or exitstatus != 0 or torch.cuda.is_available():
        return
    unused = [name for name, count in cpu.hits().items() if count == 0]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if unused:
        reporter.write_line(
            f"nam_runtime.cpu patches never hit by the suite (drop them?): {unused}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        reporter.write_line(f"nam_runtime.cpu: all {len(cpu.PATCHES)} patches hit: {cpu.hits()}")
