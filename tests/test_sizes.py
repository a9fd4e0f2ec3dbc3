"""Sizes on the command line: one parser, binary units, one-line errors."""

from __future__ import annotations

import pytest

from anomos.cli import run
from anomos.config import parse_size
from anomos.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("262144", 262144),
        ("256K", 256 << 10),
        ("256KiB", 256 << 10),
        ("16mb", 16 << 20),
        (" 1.5G ", 3 << 29),
        ("2 TiB", 2 << 40),
        ("0", 0),
    ],
)
def test_sizes_parse_in_binary_units(text: str, size: int) -> None:
    assert parse_size(text, "size") == size


@pytest.mark.parametrize("text", ["", "-1", "1e3", "12 bytes", "K", "1.5.2M", "1x"])
def test_a_bad_size_names_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--grace .* is not a size such as"):
        parse_size(text, "--grace")


def test_bounds_are_inclusive_and_named() -> None:
    assert parse_size("16K", "--size", minimum=16 << 10, maximum=4 << 30) == 16 << 10
    assert parse_size("4G", "--size", minimum=16 << 10, maximum=4 << 30) == 4 << 30
    with pytest.raises(ConfigError, match=r"--size '15K' is out of range \(16,384 to"):
        parse_size("15K", "--size", minimum=16 << 10, maximum=4 << 30)
    with pytest.raises(ConfigError, match="out of range"):
        parse_size("4.1G", "--size", minimum=16 << 10, maximum=4 << 30)


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["bench", "--size", "1K"], "--size '1K' is out of range"),
        (["demo", "--size", "lots"], "--size 'lots' is not a size"),
        (
            [
                "make",
                ".",
                "--tracker",
                "https://t.example/a",
                "--fingerprint",
                "ab" * 32,
                "-o",
                "x",
                "--piece-size",
                "3Q",
            ],
            "piece size '3Q' is not a size",
        ),
    ],
)
def test_commands_refuse_bad_sizes_in_one_line(
    args: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(args) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"anomos: error: {why}"), lines
