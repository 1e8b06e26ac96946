"""How hard hypothesis searches: the tests write their example counts as ``examples(n)``.

Profiles (``HYPOTHESIS_PROFILE``): unset, random seeds and n examples (a local run explores new inputs each
time); ``ci`` (what ``CI=true`` selects), derandomised, n examples, so that a red CI is reproducible; ``deep``,
random seeds and 10 n examples, for a search before a release or after a change to the engine.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("deep", derandomize=False, print_blob=True, max_examples=1000)  # 10x the default

PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else None)
DEPTH = 10 if PROFILE == "deep" else 1


def examples(n: int) -> int:
    """n examples, times 10 under the deep profile."""
    return n * DEPTH


def load() -> None:
    if PROFILE:
        settings.load_profile(PROFILE)
