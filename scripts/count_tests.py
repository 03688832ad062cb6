"""Count the default suite's tests two ways: raw (every collected test id, so each parametrized case counts)
and distinct properties (a parametrized test counts once; a Hypothesis test is one test already).

Usage: .venv/bin/python scripts/count_tests.py [pytest args...]   (default: the suite pytest runs with no
arguments, i.e. the pyproject's ``-m 'not slow and not gpu'``). Prints both counts and the ten test
functions with the most cases.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections import Counter

import pytest


class Counts:
    def __init__(self) -> None:
        self.per_property: Counter[str] = Counter()

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            # The test id without its parameters: path::[Class::]function
            self.per_property[item.nodeid.split("[", 1)[0]] += 1


def main(argv: list[str]) -> int:
    counts, log = Counts(), io.StringIO()
    with contextlib.redirect_stdout(log):
        rc = pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", *argv], plugins=[counts])
    if rc not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        print(log.getvalue())
        return int(rc)
    raw, distinct = sum(counts.per_property.values()), len(counts.per_property)
    print(f"raw tests: {raw}")
    print(f"distinct properties: {distinct}")
    print("most cases per property:")
    for name, n in counts.per_property.most_common(10):
        print(f"  {n:5d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
