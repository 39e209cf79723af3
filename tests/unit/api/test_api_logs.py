"""`--log-format json`: one JSON object a line, extras (volume, epoch, node) as keys."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from pxcluster.node import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    logging.basicConfig(force=True)


def test_json_lines_carry_extras(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "json")
    log = logging.getLogger("pxcluster.engine.volume")
    log.warning("replica %s stale", "n2", extra={"volume": "db", "epoch": 7, "node": "n1"})
    log.debug("not shown")
    try:
        raise OSError("disk gone")
    except OSError:
        log.exception("write failed", extra={"volume": "db", "blob": b"\x00"})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "replica n2 stale" and first["level"] == "warning"
    assert first["logger"] == "pxcluster.engine.volume"
    assert (first["volume"], first["epoch"], first["node"]) == ("db", 7, "n1")
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert set(first) == {"ts", "level", "logger", "msg", "volume", "epoch", "node"}
    assert second["level"] == "error" and "OSError: disk gone" in second["exc"]
    assert second["blob"] == "b'\\x00'"  # not JSON-native: stringified, the line kept


def test_text_format_and_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "text")
    logging.getLogger("x").info("hello")
    assert " INFO x: hello" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown log format"):
        logs.setup("INFO", "xml")
