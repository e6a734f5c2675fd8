"""The one argument-checking module: TypeError for a wrong type, ValueError for a wrong value, the argument named."""
import math

import pytest
import torch

from facd_fast.checks import check_choice, check_int, check_real, check_scale
from facd_fast.train.config import ConfigError, load_config


@pytest.mark.parametrize("value", [True, 2.0, "2", torch.tensor(2), None])
def test_an_int_is_an_int(value):
    with pytest.raises(TypeError, match="count must be an int"):
        check_int("count", value)


@pytest.mark.parametrize("value", [True, "0.1", torch.tensor(0.1), None, [0.1]])
def test_a_real_is_a_plain_number(value):
    with pytest.raises(TypeError, match="weight must be a real number"):
        check_real("weight", value)


@pytest.mark.parametrize("call, match", [
    (lambda: check_int("count", 0, 1), "count must be >= 1, got 0"),
    (lambda: check_int("count", 9, 1, 8), r"count must be in \[1, 8\], got 9"),
    (lambda: check_real("eps", 0.0, 0.0, least_inclusive=False), "eps must be > 0.0, got 0.0"),
    (lambda: check_real("decay", 1.0, 0.0, 1.0, greatest_inclusive=False), r"decay must be in \[0.0, 1.0\), got 1.0"),
    (lambda: check_real("lr", math.nan), "lr must be a finite number, got nan"),
    (lambda: check_real("lr", math.inf), "lr must be a finite number, got inf"),
    (lambda: check_choice("distance", "l3", ("l1", "l2")), r"distance must be one of \['l1', 'l2'\], got 'l3'"),
    (lambda: check_choice("use_mask", 1, ("auto", True, False)), "use_mask must be one of"),
    (lambda: check_scale("scale", 5), "scale must be one of powers of two and 3"),
])
def test_a_wrong_value_is_a_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_checks_return_the_value():
    assert check_int("n", 3, 1) == 3 and check_real("x", 2, 0.0) == 2.0 and isinstance(check_real("x", 2), float)
    assert check_scale("scale", 8) == 8 and check_choice("m", "l1", ("l1", "l2")) == "l1"


def test_config_errors_are_type_and_value_errors_alike():
    with pytest.raises(TypeError, match="train.lr must be of type float"):
        load_config(None, ['train.lr="fast"'])
    with pytest.raises(ConfigError, match="train.lr must be of type float"):
        load_config(None, ['train.lr="fast"'])
    with pytest.raises(ValueError, match=r"train.ema_decay must be in \[0.0, 1.0\), got 1.0"):
        load_config(None, ["train.ema_decay=1.0"])
    with pytest.raises(ValueError, match="model.scale must be one of"):
        load_config(None, ["model.scale=5"])
