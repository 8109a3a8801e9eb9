"""Pytrees (``torch.utils._pytree`` is private)."""

from __future__ import annotations

from torch.utils import _pytree

# -- pytrees (torch.utils._pytree is private) ---------------------------------------
tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten
tree_leaves = _pytree.tree_leaves
tree_map = _pytree.tree_map
