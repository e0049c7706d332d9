"""Sizes read and printed in one place: ``parse_size`` and ``format_bytes`` speak the same units."""

from __future__ import annotations

import pytest

from nbisolate.errors import IsolateUsageError
from nbisolate.units import format_bytes, parse_size, short_repr, shorten


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2G", 2 * 1024**3),
        ("500M", 500 * 1024**2),
        ("1.5GB", int(1.5 * 1024**3)),
        ("1024", 1024),
        ("64k", 64 * 1024),
        ("1T", 1024**4),
        ("2GiB", 2 * 1024**3),
        (" 300 MB ", 300 * 1024**2),
        ("10B", 10),
    ],
)
def test_parse_size_reads_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "2X", "", "M", "1.2.3G", "nan", "inf"])
def test_parse_size_refuses_what_it_cannot_read_and_says_how_to_write_it(text: str) -> None:
    with pytest.raises(IsolateUsageError) as info:
        parse_size(text)
    assert str(info.value) == (
        f"cannot read size {text!r}: use a number with K, M, G or T, like 500M or 2G; nothing ran."
    )


@pytest.mark.parametrize("text", ["0", "0M", "-1G"])
def test_parse_size_refuses_a_limit_of_nothing(text: str) -> None:
    with pytest.raises(IsolateUsageError, match=rf"size '{text}' must be more than zero; nothing ran\."):
        parse_size(text)


def test_a_parsed_size_prints_back_as_typed() -> None:
    assert format_bytes(parse_size("500M")) == "500.0 MB"
    assert format_bytes(parse_size("2G")) == "2.0 GB"
    assert format_bytes(parse_size("1.5K")) == "1.5 KB"
    assert format_bytes(100_000_000) == "95.4 MB"
    assert format_bytes(512) == "512 B"


def test_short_texts_are_bounded_and_never_raise() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert shorten("abcdef", 5) == "ab..."
    assert short_repr(Broken(), 80, "<broken>") == "<broken>"
    assert short_repr("x" * 100, 10) == "'xxxxxx..."
