from importlib.metadata import version

import nam_mixers


def test_installed_version_matches_module() -> None:
    assert nam_mixers.__version__ == version("nam-mixers")
