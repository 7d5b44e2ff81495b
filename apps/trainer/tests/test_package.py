from importlib.metadata import version

import nam_trainer


def test_installed_version_matches_module() -> None:
    assert nam_trainer.__version__ == version("nam-trainer")
