"""``python -m benchmarks``: the workload tables, or with ``--long-unroll`` the long inner loops."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Runs :mod:`benchmarks.run`, or :mod:`benchmarks.long_unroll` given ``--long-unroll``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--long-unroll" in args:
        from .long_unroll import main as long_unroll

        return long_unroll([a for a in args if a != "--long-unroll"])
    from .run import main as workloads

    return workloads(args)


if __name__ == "__main__":
    raise SystemExit(main())
