"""Bad-input campaign: run every case of tests/bad_inputs.py and classify the outcome.

GOOD: a clear error (or, for degenerate inputs, a warning and a correct result) whose message
names the offending file or argument. POOR: an error that names neither, an internal error
type (IndexError, ZeroDivisionError, ...), an error where a usable result with a warning was
expected, or a correct result without a warning. BAD: no error for bad input, a silently wrong
result, or a checkpoint that ran code.

Usage (runs against whichever hest2sge is first on PYTHONPATH, so older versions can be
compared on the same cases)::

    PYTHONPATH=. python benchmarks/bad_input_campaign.py [--verbose]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bad_inputs import CASES  # noqa: E402

INTERNAL = (IndexError, ZeroDivisionError, AttributeError, AssertionError, NameError,
            RecursionError, UnboundLocalError)


def classify(case, tmp: Path) -> tuple[str, str]:
    """(verdict, one-line detail) of one case."""
    probe = case.build(tmp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = probe.call()
        except Exception as err:  # noqa: BLE001
            line = (str(err).strip().splitlines() or [""])[0][:160]
            detail = f"{type(err).__name__}: {line}"
            if isinstance(err, AssertionError):
                return "BAD", detail
            if case.kind == "warn":
                return "POOR", "error instead of a result: " + detail
            if isinstance(err, INTERNAL) or probe.needle not in str(err):
                return "POOR", detail
            return "GOOD", detail
    warned = [str(w.message) for w in caught if probe.needle in str(w.message)]
    if case.kind != "warn":
        return "BAD", "no error" + (f" (warning: {warned[0][:120]})" if warned else "")
    try:
        probe.check(result)
    except AssertionError as err:
        return "BAD", f"wrong result: {err}"
    if not warned:
        return "POOR", "correct result but no warning naming " + repr(probe.needle)
    return "GOOD", "warning: " + warned[0][:140]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true", help="print every case")
    args = ap.parse_args(argv)
    import hest2sge

    counts: Counter[str] = Counter()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for i, case in enumerate(CASES):
            verdict, detail = classify(case, Path(root) / f"c{i}")
            counts[verdict] += 1
            if args.verbose or verdict != "GOOD":
                print(f"{verdict:5s} {case.id:45s} {detail}")
    print(f"hest2sge {hest2sge.__file__}: {len(CASES)} kinds of bad input: "
          f"GOOD {counts['GOOD']}, POOR {counts['POOR']}, BAD {counts['BAD']} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
