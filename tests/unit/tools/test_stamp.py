from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from pxcluster.tools import stamp
from tests.harness.stamps import CLIENT


def _client_module() -> types.ModuleType:
    sys.modules.setdefault("nbd", types.ModuleType("nbd"))  # the format needs no libnbd
    spec = importlib.util.spec_from_file_location("stamp_client", CLIENT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_round_trip_and_zero() -> None:
    data = stamp.make(7, 42, 12345)
    assert len(data) == stamp.BLOCK
    assert stamp.parse(data) == (7, 42, 12345)
    assert stamp.parse(bytes(stamp.BLOCK)) is None


@pytest.mark.parametrize("where", [0, 10, 40, 100, 4095])
def test_any_flipped_byte_is_garbage(where: int) -> None:
    data = bytearray(stamp.make(1, 2, 3))
    data[where] ^= 0x55
    with pytest.raises(ValueError):
        stamp.parse(bytes(data))


def test_harness_client_speaks_the_same_format() -> None:
    client = _client_module()
    assert client.make(5, 6, 7) == stamp.make(5, 6, 7)
