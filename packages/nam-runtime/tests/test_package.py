from importlib.metadata import version

import nam_runtime


def test_installed_version_matches_module() -> None:
    assert nam_runtime.__version__ == version("nam-runtime")
