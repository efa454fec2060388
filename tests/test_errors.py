"""first_line: the one-line form of an exception that error reports and results quote."""

import pytest

from eclip.errors import first_line


@pytest.mark.parametrize("error,limit,want", [
    (ValueError("bad value\nsecond line"), None, "bad value"),
    (ValueError("a long message"), 6, "a long"),
    (ValueError("short"), 160, "short"),
    # no message to quote: the type names the failure, without the "()" of its repr
    (MemoryError(), None, "MemoryError"),
    (OSError(""), None, "OSError"),
    # an empty first line would read "(ValueError: )": the type stands in for it too
    (ValueError("\nthe details"), None, "ValueError"),
    (KeyError("x"), None, "'x'"),
])
def test_first_line(error, limit, want):
    assert first_line(error, limit) == want
