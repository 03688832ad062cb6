"""Mutation check: every invariant the project claims has a default-suite test that fails when it breaks.

Each mutant (``scripts/mutant_list.py``) is a small, deliberate bug: textual edits (file, old text, new text).
The script copies the package, its configs, recipes, tests and docs to a temporary directory, checks that
Python imports ``qat`` from that copy, runs the selected tests once unmutated (they must pass), then for each
mutant in turn applies its edits to the copy, runs the mutant's tests with the default markers
(``-m 'not slow and not gpu'``, stopping at the first failure) and restores the files. A mutant is *caught*
when a test fails and *survives* when they all pass; the exit status is 1 if any survives. An old text that
is not found exactly once stops everything before any test runs: the code moved, so update the mutant.

    python scripts/mutants.py                      # every mutant on its own tests
    python scripts/mutants.py --only resume-ignores-checkpoint ddp-scale-from-rank-zero-removed
    python scripts/mutants.py --all                # every mutant on the whole default suite (slow)
    python scripts/mutants.py --list               # the mutants, their files and tests

The working tree is never modified. Mutants run one after another, with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a file, not a package
from mutant_list import MUTANTS, Mutant  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# What the tests need: the package, Hydra configs and recipes, the tests, pytest's settings; README, docs,
# scripts and .ci only for --all (docs and CLI tests read them).
COPY = ["qat", "tests", "pyproject.toml", "README.md", "docs", "scripts", ".ci"]
DEFAULT_MARKERS = "not slow and not gpu"


# ---------------------------------------------------------------------------------------------- the copy
def make_copy(root: Path) -> None:
    """The files the tests need, without caches, under ``root``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, root / name)


def tests_env(root: Path) -> dict[str, str]:
    """The environment of every test run: the copy first on the path, one thread, no bytecode caches (a
    restored file of the same size and second as its mutant must not load the mutant's cached bytecode)."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def check_imports_the_copy(root: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import qat; print(qat.__file__)"],
        cwd=root, env=tests_env(root), capture_output=True, text=True, check=True,
    )  # fmt: skip
    where = Path(proc.stdout.strip()).resolve()
    if not where.is_relative_to(root.resolve()):
        sys.exit(f"mutants: the tests would import qat from {where}, not from the copy {root}")
    print(f"tests import qat from the copy: {where}")


def check_edits(root: Path, mutants: list[Mutant]) -> None:
    """Every old text occurs exactly once (in the file as the mutant's earlier edits left it), and every
    mutated Python file still compiles."""
    problems = []
    for m in mutants:
        texts: dict[str, str] = {}
        for e in m.edits:
            path = root / e.file
            if not path.is_file():
                problems.append(f"{m.name}: {e.file} does not exist")
                continue
            text = texts.setdefault(e.file, path.read_text())
            count = text.count(e.old)
            if count != 1:
                where = "not found" if count == 0 else f"found {count} times"
                problems.append(f"{m.name}: old text {where} in {e.file} (the code moved: update the mutant)")
                continue
            texts[e.file] = text.replace(e.old, e.new)
        for file, text in texts.items():  # a syntax error would be "caught" for the wrong reason
            if file.endswith(".py"):
                try:
                    compile(text, file, "exec")
                except SyntaxError as err:
                    problems.append(
                        f"{m.name}: the mutated {file} does not compile ({err.msg}, line {err.lineno})"
                    )
    if problems:
        sys.exit("mutants: cannot apply:\n  " + "\n  ".join(problems))


def apply(root: Path, m: Mutant) -> dict[Path, str]:
    """Apply the mutant's edits; returns the original text of every file it changed."""
    originals: dict[Path, str] = {}
    for e in m.edits:
        path = root / e.file
        text = path.read_text()
        originals.setdefault(path, text)
        path.write_text(text.replace(e.old, e.new, 1))
    return originals


def restore(originals: dict[Path, str]) -> None:
    for path, text in originals.items():
        path.write_text(text)


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    status: str  # "passed" | "failed" | "error" | "timeout"
    seconds: float
    failures: list[str]
    output: str


def run_tests(root: Path, tests: list[str], timeout: float) -> Outcome:
    """pytest on ``tests`` in the copy: default markers, serially (-n 0), stopping at the first failure."""
    cmd = [
        sys.executable, "-m", "pytest", "-x", "-n", "0", "-p", "no:cacheprovider", "-m", DEFAULT_MARKERS,
        "--basetemp", str(root / ".pytest-tmp"), *tests,
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=root, env=tests_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the pytest process group this function started
        out, _ = proc.communicate()
        return Outcome("timeout", time.monotonic() - t0, [], out)
    seconds = time.monotonic() - t0
    failures = [line.split(" - ")[0] for line in out.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    # pytest: 0 all passed, 1 tests failed, 2 interrupted (e.g. a collection error), 4 usage error,
    # 5 nothing collected (e.g. every selected test is slow).
    status = {0: "passed", 1: "failed", 2: "failed"}.get(proc.returncode, "error")
    if proc.returncode == 2 and not failures:
        failures = ["(collection error)"]
    return Outcome(status, seconds, failures, out)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--all", action="store_true", help="run the whole default suite for each mutant")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run (default 1800)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = parser.parse_args(argv)

    known = {m.name: m for m in MUTANTS}
    unknown = sorted(set(args.only or []) - set(known))
    if unknown:
        parser.error(f"unknown mutant(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
    mutants = [known[n] for n in args.only] if args.only else list(MUTANTS)
    if args.list:
        for m in mutants:
            files = ", ".join(sorted({e.file for e in m.edits}))
            print(f"{m.name}\n    breaks: {m.breaks}\n    edits:  {files}\n    tests:  {' '.join(m.tests)}")
        return 0

    def tests_of(m: Mutant) -> list[str]:
        return ["tests"] if args.all else list(m.tests)

    root = Path(tempfile.mkdtemp(prefix="qat-mutants-"))
    t_start = time.monotonic()
    try:
        make_copy(root)
        check_edits(root, mutants)
        check_imports_the_copy(root)
        if not args.no_baseline:
            union = list(dict.fromkeys(t for m in mutants for t in tests_of(m)))
            base = run_tests(root, union, args.timeout)
            print(f"unmutated: {base.status} in {base.seconds:.0f}s ({len(union)} test selections)")
            if base.status != "passed":
                print(tail(base.output))
                print("mutants: the tests fail (or select nothing) without any mutant: fix that first")
                return 2
        results: list[tuple[Mutant, Outcome]] = []
        for m in mutants:
            originals = apply(root, m)
            try:
                outcome = run_tests(root, tests_of(m), args.timeout)
            finally:
                restore(originals)
            results.append((m, outcome))
            verdict = {"passed": "SURVIVED", "failed": "caught", "timeout": "caught (timeout)"}
            word = verdict.get(outcome.status, "ERROR")
            first = outcome.failures[0] if outcome.failures else ""
            print(f"{m.name:42s} {word:16s} {outcome.seconds:6.0f}s  {first}", flush=True)
            if outcome.status in ("passed", "error"):
                print(tail(outcome.output, 15))
    finally:
        if args.keep:
            print(f"copy kept at {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    survived = [m.name for m, o in results if o.status == "passed"]
    errors = [m.name for m, o in results if o.status == "error"]
    caught = len(results) - len(survived) - len(errors)
    total = time.monotonic() - t_start
    counts = f"{caught} caught, {len(survived)} survived, {len(errors)} errors"
    print(f"\n{len(results)} mutants: {counts} ({total:.0f}s)")
    for name in survived:
        print(f"  survived: {name}")
    for name in errors:
        print(f"  error (pytest could not run the tests): {name}")
    return 1 if survived or errors else 0


if __name__ == "__main__":
    sys.exit(main())
