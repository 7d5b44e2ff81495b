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
    "nam-layout": ("packages/nam-layout", 120),
    "nam-mixers": ("packages/nam-mixers", 600),
    "nam-runtime": ("packages/nam-runtime", 600),
    "nam-embed": ("packages/nam-embed", 400),
    "nam-plasticity": ("packages/nam-plasticity", 400),
    "nam-spec": ("packages/nam-spec", 600),
    "nam-trainer": ("apps/trainer", 1200),
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


# mamba-ssm (the Mamba split path's Triton kernels) stays out of uv.lock (DESIGN.md, runtime policy):
# the mixers session builds it once as a pure-Python wheel into nox's cache and installs it without
# dependencies, so the split-vs-reference tests run under the Triton interpreter in CI.
MAMBA_SSM = "2.3.2.post1"


def _install_mamba_ssm(session: nox.Session) -> None:
    wheels = Path(session.cache_dir) / "wheels"
    pattern = f"mamba_ssm-{MAMBA_SSM}-*.whl"
    if not list(wheels.glob(pattern)):
        # its setup.py imports torch (hence no build isolation) and tries a download first (FORCE_BUILD)
        session.install("pip", "setuptools", "wheel", "ninja", "packaging")
        session.run(
            *("python", "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *(f"mamba-ssm=={MAMBA_SSM}", "-w", str(wheels)),
            env={"MAMBA_FORCE_BUILD": "TRUE", "MAMBA_SKIP_CUDA_BUILD": "TRUE"},
        )
    session.install("--no-deps", str(sorted(wheels.glob(pattern))[-1]))
    # Its package import pulls in the Mamba-1 CUDA op, which the SSD kernels never call and a
    # pure-Python build lacks: a placeholder module lets it import (bench/gpu.sh does the same).
    site = session.run("python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", silent=True)
    Path(site.strip(), "selective_scan_cuda.py").write_text("# placeholder for mamba-ssm's Mamba-1 CUDA op\n")
    session.env["NAM_REQUIRE_MAMBA_SSM"] = "1"  # the split tests fail, not skip, if it still cannot import


# per-package set-up after the locked environment is synced
SETUP = {"nam-mixers": _install_mamba_ssm}


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
        if name in SETUP:
            SETUP[name](session)
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
    session.run("python", "tools/check_dependencies.py")
