"""The CLI's last resort: whatever a command raises ends as one `error:` line and a non-zero
status; the traceback only with -v."""

from __future__ import annotations

import click
import pytest

from pxcluster import cli
from pxcluster.cli.params import Int


def group() -> click.Group:
    @click.group(cls=cli.Group)
    @click.option("-v", "--verbose", count=True)
    def g(verbose: int) -> None:
        cli.Group.verbose = verbose

    @g.command()
    def boom() -> None:
        raise RuntimeError("first line\nsecond line")

    @g.command()
    @click.option("--n", type=Int(1, 3))
    def count(n: int) -> None:
        click.echo(n)

    return g


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exit_:
        group().main(list(args), prog_name="pxc")
    err = capsys.readouterr().err
    code = exit_.value.code
    assert isinstance(code, int)
    return code, [ln for ln in err.splitlines() if ln.strip()]


def test_unexpected_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run(capsys, "boom")
    assert code == 1 and lines == ["error: RuntimeError: first line second line"]


def test_verbose_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run(capsys, "-v", "boom")
    assert code == 1 and lines[0].startswith("Traceback") and lines[-1].startswith("error: ")
    cli.Group.verbose = 0


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for args, needle in [
        (("count", "--n", "9" * 5000), "--n"),
        (("count", "--n", "0"), "must be 1, 2 or 3"),
        (("nosuch",), "No such command"),
        (("count", "--" + "x" * 5000), "No such option"),
    ]:
        code, lines = run(capsys, *args)
        assert code == 2 and len(lines) == 1 and needle in lines[0], (args[:2], lines)
        assert lines[0].startswith("error: ") and len(lines[0]) < 320


def test_success_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        group().main(["count", "--n", "2"], prog_name="pxc")
    assert exit_.value.code == 0 and capsys.readouterr().out == "2\n"
