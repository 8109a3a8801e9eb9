"""Point links between the repository's Markdown files at the pages that include them.

``docs/benchmarks.md`` includes ``benchmarks/README.md``, ``docs/examples.md``
includes ``examples/README.md`` and so on, so that their figures live in one
place. Those files link to each other by repository path
(``../benchmarks/README.md#long-inner-loops``), which is right on GitHub but is
no document of the site. While such a file is included, this rewrites every link
to another included file into a link to its page; ``readme_pages`` in
``conf.py`` maps each file (relative to the repository root) to its page.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx

_LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def rewrite(text: str, included: str, pages: dict[str, str]) -> str:
    """``text`` of the repository file ``included`` with its links to ``pages`` rewritten.

    Args:
        text: the Markdown source.
        included: its path relative to the repository root (``examples/README.md``).
        pages: repository path -> docname of the page that includes it.
    """
    base = posixpath.dirname(included)

    def replace(match: re.Match[str]) -> str:
        target = posixpath.normpath(posixpath.join(base, match.group(1)))
        if target not in pages:
            return match.group(0)
        return f"]({pages[target]}.md{match.group(2) or ''})"

    return _LINK.sub(replace, text)


def on_include_read(
    app: Sphinx, relative_path: Path, parent_docname: str, content: list[str]
) -> None:
    source = (Path(app.srcdir) / relative_path).resolve()
    root = Path(app.confdir).resolve().parent
    if not source.is_relative_to(root):
        return
    included = source.relative_to(root).as_posix()
    if included in app.config.readme_pages:
        content[0] = rewrite(content[0], included, app.config.readme_pages)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("readme_pages", {}, "env", types=[dict])
    app.connect("include-read", on_include_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
