"""Make every name of a documented object resolve to the one place it is documented.

The same object often has several names:

* ``higher.monkeypatch`` is ``higher.patch.monkeypatch`` (a re-export), and
  ``higher.optim.safe_sqrt`` is ``higher.optim._ops.safe_sqrt`` (where it is
  defined, which is what type hints and autodoc report);
* ``torch.optim.optimizer.Optimizer`` is ``torch.optim.Optimizer``, the name
  under which PyTorch documents it.

The API reference documents each of higher's objects once, under the public
module that owns it. After reading, every other public name bound to the same
object (in the ``__all__`` of a documented module) and its defining path are
registered as aliases of that entry, so they link there and are listed in the
site's ``objects.inv``. A reference to a torch object by its defining path is
retried under the public name that PyTorch's inventory holds.
"""

from __future__ import annotations

import importlib
from typing import Any

from docutils import nodes
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.domains.python import ObjectEntry
from sphinx.environment import BuildEnvironment
from sphinx.ext import intersphinx


def resolve(fullname: str) -> Any:
    """The object a dotted name refers to, or None when there is none."""
    module_name, _, attr = fullname.rpartition(".")
    while module_name:
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            module_name, _, head = module_name.rpartition(".")
            attr = f"{head}.{attr}"
            continue
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        return obj
    return None


def public_name(fullname: str) -> str | None:
    """The shortest ``package.name`` bound to the same object as ``fullname``.

    ``torch.optim.adam.Adam`` -> ``torch.optim.Adam``; None when nothing shorter
    names it.
    """
    obj = resolve(fullname)
    parts = fullname.split(".")
    if obj is None:
        return None
    for i in range(1, len(parts) - 1):
        prefix = ".".join(parts[:i])
        try:
            module = importlib.import_module(prefix)
        except ImportError:
            return None
        if getattr(module, parts[-1], None) is obj:
            return f"{prefix}.{parts[-1]}"
    return None


def add_aliases(app: Sphinx, env: BuildEnvironment) -> None:
    objects: dict[str, ObjectEntry] = env.get_domain("py").objects  # type: ignore[attr-defined]
    documented = {}  # id(object) -> (object, the name it is documented under)
    for name, entry in sorted(objects.items()):
        if not entry.aliased and entry.objtype != "module" and name.startswith("higher."):
            obj = resolve(name)
            if obj is not None:
                documented.setdefault(id(obj), (obj, name))

    def alias(new: str, target: str) -> None:
        if new not in objects:
            entry = objects[target]
            objects[new] = ObjectEntry(entry.docname, entry.node_id, entry.objtype, True)

    for obj, name in documented.values():
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if module and qualname:
            alias(f"{module}.{qualname}", name)
    for module_name in [n for n, e in objects.items() if e.objtype == "module"]:
        module = importlib.import_module(module_name)
        for attr in getattr(module, "__all__", ()):
            found = documented.get(id(getattr(module, attr)))
            if found is not None:
                alias(f"{module_name}.{attr}", found[1])


def torch_by_public_name(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.TextElement
) -> nodes.reference | None:
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("torch."):
        return None
    public = public_name(target)
    if public is None:
        return None
    node["reftarget"] = public
    return intersphinx.missing_reference(app, env, node, contnode)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("env-updated", add_aliases)
    app.connect("missing-reference", torch_by_public_name)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
