import pytest

from semi_llie.errors import ConfigError
from semi_llie.registry import Registry


def make_registry() -> Registry:
    things = Registry("thing")

    @things.register()
    class Widget:
        def __init__(self, size: int = 1, colour: str = "red") -> None:
            self.size, self.colour = size, colour

    return things


def test_build_passes_keys_and_extra_arguments():
    widget = make_registry().build({"type": "Widget", "size": 3}, colour="blue")
    assert (widget.size, widget.colour) == (3, "blue")


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'szie'.*did you mean 'size'"):
        make_registry().build({"type": "Widget", "szie": 3})


def test_unknown_type_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown thing type 'Widgt'.*did you mean 'Widget'"):
        make_registry().build({"type": "Widgt"})


def test_missing_type_is_an_error():
    with pytest.raises(ConfigError, match="no 'type' key"):
        make_registry().build({"size": 3})


def test_registering_a_name_twice_is_a_bug():
    things = make_registry()
    with pytest.raises(ValueError, match="registered twice"):
        things.register("Widget")(object)
