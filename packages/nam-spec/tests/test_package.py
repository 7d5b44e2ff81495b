from importlib.metadata import version

import nam_spec


def test_installed_version_matches_module() -> None:
    assert nam_spec.__version__ == version("nam-spec")
