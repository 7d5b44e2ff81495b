from importlib.metadata import version

import nam_embed


def test_installed_version_matches_module() -> None:
    assert nam_embed.__version__ == version("nam-embed")
