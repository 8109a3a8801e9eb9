"""What the fuzzers share: their seeds, and failures that say how to replay them."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any


def seeds(ci_examples: int) -> list[int]:
    """The seeds to run: ``HIGHER_FUZZ_SEED`` alone, else ``HIGHER_FUZZ_EXAMPLES`` of them
    (``ci_examples`` by default, the budget of a suite run)."""
    if "HIGHER_FUZZ_SEED" in os.environ:
        return [int(os.environ["HIGHER_FUZZ_SEED"])]
    return list(range(int(os.environ.get("HIGHER_FUZZ_EXAMPLES", str(ci_examples)))))


def replayable(describe: Callable[[int], Any]) -> Callable[[Callable[[int], None]], Any]:
    """Makes any error of a seeded test an AssertionError that shows ``describe(seed)``
    (the case, and the command that replays it); assertion failures show it already."""

    def wrap(test: Callable[[int], None]) -> Callable[[int], None]:
        @functools.wraps(test)
        def run(seed: int) -> None:
            try:
                test(seed)
            except AssertionError:
                raise
            except Exception as error:
                raise AssertionError(
                    f"{type(error).__name__}: {error}\n{describe(seed)}"
                ) from error

        return run

    return wrap
