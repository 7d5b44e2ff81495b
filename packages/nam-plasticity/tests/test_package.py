from importlib.metadata import version

import nam_plasticity


def test_installed_version_matches_module() -> None:
    assert nam_plasticity.__version__ == version("nam-plasticity")
