"""The serving processes' malloc settings: applied on glibc, skipped at 0, validated in config."""
from __future__ import annotations

import ctypes.util

import pytest

from cloudmatrix.allocator import tune_allocator
from cloudmatrix.config import ServerConfig


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to tune")
def test_the_settings_take_effect_on_glibc_and_zero_leaves_the_defaults():
    assert tune_allocator(256 * 2**20) is True
    assert tune_allocator(0) is False


@pytest.mark.parametrize("value", [-1, 2**31])
def test_malloc_retain_bytes_out_of_range_is_a_config_error_naming_the_field(value):
    with pytest.raises(ValueError, match="malloc_retain_bytes: must be in"):
        ServerConfig(malloc_retain_bytes=value)
