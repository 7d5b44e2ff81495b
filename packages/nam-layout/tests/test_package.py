from importlib.metadata import version

import nam_layout


def test_installed_version_matches_module() -> None:
    assert nam_layout.__version__ == version("nam-layout")
