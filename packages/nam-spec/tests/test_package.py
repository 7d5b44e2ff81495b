from importlib.metadata import version

import nam_spec


def test_installed_version_matches_module() -> None:
    assert nam_spec.__version__ == version("nam-spec")


def test_lazy_public_names_are_the_functions() -> None:
    from nam_spec.description import describe
    from nam_spec.model import build_model
    from nam_spec.specs import layer_specs

    assert (nam_spec.describe, nam_spec.build_model, nam_spec.layer_specs) == (
        describe,
        build_model,
        layer_specs,
    )
