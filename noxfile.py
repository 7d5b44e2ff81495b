"""Test sessions: one per package, each in its own environment built from uv.lock, so a
dependency a package uses but does not declare fails its own session.

    uv run nox                 # everything CI runs
    uv run nox -s layout       # one package
    uv run nox -s layout_bare  # nam-layout installed alone by pip, without torch
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PYTHON = "3.12"

# package name -> (folder, wall-clock budget of its test run in seconds). The budgets add up to
# well inside CI's 90 minutes on 2 cores; a session that runs past its budget fails.
PACKAGES: dict[str, tuple[str, int]] = {
    "nam-layout": ("packages/nam-layout", 300),
    "nam-mixers": ("packages/nam-mixers", 900),
    "nam-runtime": ("packages/nam-runtime", 900),
    "nam-embed": ("packages/nam-embed", 600),
    "nam-plasticity": ("packages/nam-plasticity", 600),
    "nam-spec": ("packages/nam-spec", 900),
    "nam-trainer": ("apps/trainer", 900),
}

# Two threads per process on the 2-core CI machine; multi-process tests set 1 per rank.
ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": ""}


def _run_tests(session: nox.Session, folder: str, budget_s: int) -> None:
    session.chdir(ROOT / folder)
    session.run(
        "timeout",
        "--kill-after=30",
        str(budget_s),
        "python",
        "-m",
        "pytest",
        "-q",
        *session.posargs,
        env=ENV,
        external=True,
    )


def _package_session(name: str, folder: str, budget_s: int) -> None:
    @nox.session(name=name.removeprefix("nam-"), python=PYTHON)
    def tests(session: nox.Session) -> None:
        # Only this package, its declared dependencies and its test group, pinned by uv.lock.
        session.run_install(
            "uv",
            "sync",
            "--frozen",
            "--no-default-groups",
            "--package",
            name,
            "--group",
            "test",
            env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
        )
        _run_tests(session, folder, budget_s)


for _name, (_folder, _budget) in PACKAGES.items():
    _package_session(_name, _folder, _budget)


@nox.session(python=PYTHON, reuse_venv="never")
def layout_bare(session: nox.Session) -> None:
    """nam-layout installed by pip alone into a fresh environment: no torch, no other package."""
    session.install("pip")
    session.run("python", "-m", "pip", "install", "-q", str(ROOT / "packages/nam-layout"))
    names = "import importlib.metadata as m; print(*sorted({d.metadata['Name'] for d in m.distributions()}))"
    installed = session.run("python", "-c", names, silent=True).split()
    extra = sorted(set(installed) - {"nam-layout", "pip"})
    if extra:
        session.error(f"nam-layout pulled in other packages: {extra}")
    session.run("nam-layout", "validate", "AEMEAEMEAEMR", "--depth", "52", "--json")
    session.run("nam-layout", "show", "--family", "NAM56R")
    session.install("pytest", "pytest-timeout", "hypothesis")
    _run_tests(session, "packages/nam-layout", PACKAGES["nam-layout"][1])


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    # ruff at the version uv.lock pins, so lint does not change under CI's feet
    session.run_install(
        "uv",
        "sync",
        "--frozen",
        "--only-group",
        "dev",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
