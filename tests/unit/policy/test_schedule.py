from __future__ import annotations

import pytest

from pxcluster.errors import InvalidArgument
from pxcluster.policy.schedule import Schedule, parse_schedule


def test_parse_forms() -> None:
    assert parse_schedule("every 1h keep 24") == Schedule(3600, 24)
    assert parse_schedule("  EVERY 30m  keep 2 ") == Schedule(1800, 2)
    assert parse_schedule("every 2d keep 7") == Schedule(2 * 86400, 7)
    assert parse_schedule("none") is None and parse_schedule("") is None
    assert str(Schedule(3600, 24)) == "every 1h keep 24"
    assert str(Schedule(90, 3)) == "every 90s keep 3"


@pytest.mark.parametrize(
    "text", ["hourly", "every 1h", "every 0h keep 1", "every 5s keep 1", "every 1h keep 0", "1h 24"]
)
def test_bad_schedules_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="schedule"):
        parse_schedule(text)
