"""The size rule: K/M/G/T and KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary; one formatter."""

from __future__ import annotations

import pytest

from fastckpt.rules.units import SizeError, format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("12B", 12),
        ("4KiB", 4096),
        ("4k", 4000),
        ("4KB", 4000),
        ("2GB", 2 * 10**9),
        ("2 gb", 2 * 10**9),
        ("2GiB", 2 << 30),
        ("2G", 2 * 10**9),
        ("1.5GiB", 3 << 29),
        ("7.81GB", 7_810_000_000),
        ("512MB", 512 * 10**6),
        (" 1 MiB ", 1 << 20),
        ("1T", 10**12),
        ("1TB", 10**12),
        ("0.1KB", 100),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text", ["", "GiB", "-1", "0", "1.5", "4XB", "1e9", "two GB", "1..2GB", "0.0001KB"]
)
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(SizeError, match="invalid size"):
        parse_size(text)
    with pytest.raises(ValueError):  # SizeError is a ValueError for callers that catch those
        parse_size(text)


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1 KB"),
        (512_000_000, "512 MB"),
        (7_810_000_000, "7.81 GB"),
        (3 * 10**15, "3e+03 TB"),
    ],
)
def test_format_bytes(nbytes: int, text: str) -> None:
    assert format_bytes(nbytes) == text


def test_format_then_parse_agree_on_decimal_units() -> None:
    for n in (1000, 2 * 10**9, 7_810_000_000):
        assert parse_size(format_bytes(n).replace(" ", "")) == n
