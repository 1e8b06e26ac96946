"""Fuzz the adapter reader for a while: mutate valid small adapters (the mutators of tests/test_fuzz_reader.py,
driven by a seeded random generator) and score each one on the CPU. Every input must score or be refused with
AdapterInputError; anything else is a failure, printed and saved under --save.

    python scripts/fuzz_reader.py --seconds 300 [--seed 0] [--save fuzz-failures]

Input number i uses the generator seeded with (seed, i), so a failure is reproduced by its number alone.
"""

from __future__ import annotations

import argparse
import collections
import random
import resource
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import test_fuzz_reader as fuzz  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--save", type=Path, default=None, help="directory to save failing inputs to")
    parser.add_argument("--only", type=int, default=None, help="run input number ONLY alone, with its traceback")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    outcomes: collections.Counter = collections.Counter()
    failures: dict[str, list[int]] = {}
    slowest = (0.0, -1)
    numbers = [args.only] if args.only is not None else None
    start = time.monotonic()
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        while True:
            if numbers is not None:
                if count == len(numbers):
                    break
                number = numbers[count]
            else:
                if time.monotonic() - start >= args.seconds:
                    break
                number = count
            count += 1
            weights, config = fuzz.mutate(fuzz.RandomDraw(random.Random(f"{args.seed}:{number}")))
            directory = Path(tmp) / str(number)
            directory.mkdir()
            began = time.monotonic()
            try:
                outcomes[fuzz.run_reader(directory, weights, config)] += 1
            except Exception as exc:  # the point: any exception but AdapterInputError is a finding
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                signature = (
                    f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}: "
                    f"{str(exc).splitlines()[0][:160] if str(exc) else ''}"
                )
                failures.setdefault(signature, []).append(number)
                outcomes["FAILED"] += 1
                if args.only is not None:
                    traceback.print_exc()
                if args.save is not None:
                    target = args.save / f"{args.seed}-{number}"
                    target.mkdir(parents=True, exist_ok=True)
                    (target / fuzz.WEIGHTS).write_bytes(weights)
                    (target / fuzz.CONFIG).write_bytes(config)
            slowest = max(slowest, (time.monotonic() - began, number))
            for path in directory.iterdir():
                path.unlink()
            directory.rmdir()
    elapsed = time.monotonic() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{count} inputs in {elapsed:.0f} s (seed {args.seed}): "
        + ", ".join(f"{name} {n}" for name, n in sorted(outcomes.items()))
    )
    print(f"slowest input: #{slowest[1]} ({slowest[0]:.2f} s); peak memory {peak_mib:.0f} MiB")
    for signature, numbers_seen in sorted(failures.items()):
        print(f"FAILURE x{len(numbers_seen)} (e.g. --only {numbers_seen[0]}): {signature}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
