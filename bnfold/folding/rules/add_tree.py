"""Trees of Add nodes summing branches, as multi-branch blocks (RepVGG, MobileOne, DBB, ACNet)
export them: what ``bn_branch`` and ``conv_branches`` read and rewrite.

An *Add tree* is a root Add plus every Add below it whose output is read only by the Add above it
(once, not from a nested body) and is not a graph output; its *leaves* are the other operands, in
the order a depth-first walk meets them. The tree computes the sum of its leaves, whatever its
shape, so a leaf can be taken out of the sum (``fold_leaf_into``) once its value has been added
into another leaf: the Add that read it goes, and its other operand takes its place.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnfold.folding.view import GraphView, is_default_domain


@dataclass(frozen=True)
class Leaf:
    """One summed operand: the ``value`` and the index of the tree Add that reads it."""

    value: str
    add: int


def is_sum(view: GraphView, index: int) -> bool:
    """A live default-domain binary Add with one output."""
    node = view.nodes[index]
    return (
        index not in view.removed
        and node.op_type == "Add"
        and is_default_domain(node)
        and len(node.input) == 2
        and all(node.input)
        and len(node.output) == 1
    )


def read_only_by(view: GraphView, value: str, reader: int) -> bool:
    """``value`` is read once, by ``reader`` alone (no nested body), and is not a graph output."""
    return not view.is_graph_output(value) and view.readers(value) == [reader]


def _parent_add(view: GraphView, add: int):
    out = view.nodes[add].output[0]
    readers = view.readers(out)
    if len(readers) == 1 and is_sum(view, readers[0]) and read_only_by(view, out, readers[0]):
        return readers[0]
    return None


def tree_root(view: GraphView, add: int) -> int:
    """The root of the Add tree that Add ``add`` belongs to."""
    for _ in range(len(view.nodes)):
        parent = _parent_add(view, add)
        if parent is None:
            return add
        add = parent
    return add


def is_root(view: GraphView, add: int) -> bool:
    return is_sum(view, add) and _parent_add(view, add) is None


def tree_leaves(view: GraphView, root: int) -> list[Leaf]:
    """The leaves of the tree rooted at ``root``, depth first, left operand first."""
    leaves, stack = [], [root]
    while stack:
        add = stack.pop()
        below = []
        for value in view.nodes[add].input:
            producer = view.producer_of(value)
            if producer is not None and is_sum(view, producer) and read_only_by(view, value, add):
                below.append(producer)
            else:
                leaves.append(Leaf(value, add))
        stack.extend(reversed(below))
    return leaves


def conv_leaves_by_input(view: GraphView, leaves: list[Leaf]) -> dict[str, list[int]]:
    """The Convs producing leaves, grouped by the input they read (whoever else reads their outputs)."""
    groups: dict[str, list[int]] = {}
    for leaf in leaves:
        producer = view.producer_of(leaf.value)
        if producer is None:
            continue
        node = view.nodes[producer]
        if node.op_type != "Conv" or not is_default_domain(node) or not node.input:
            continue
        groups.setdefault(node.input[0], []).append(producer)
    return groups


def _path_to_root(view: GraphView, value: str) -> list[int]:
    """The tree Adds from the one reading ``value`` up to the root."""
    path = [view.consumers[value][0]]
    while (parent := _parent_add(view, path[-1])) is not None:
        path.append(parent)
    return path


def _rename(view: GraphView, value: str) -> None:
    """Give the tree value ``value`` (read only by its Add) a fresh name: what it holds has changed."""
    producer, reader = view.producer_of(value), view.consumers[value][0]
    fresh = view.ctx.fresh_name(value)
    view.rename_output(producer, list(view.nodes[producer].output).index(value), fresh)
    view.redirect_input(reader, list(view.nodes[reader].input).index(value), fresh)


def fold_leaf_into(view: GraphView, leaf: str, into: str) -> None:
    """Take summand ``leaf`` out of the sum once what it adds has been added into summand ``into``
    (a leaf of the same tree, produced by a live node): the Add reading ``leaf`` goes, its other
    operand takes its place.

    Values keep their names only where they keep their meaning, so that a check comparing the
    values two models share by name compares like with like: ``into`` and every tree Add below the
    lowest Add summing both now hold something else and get fresh names; that Add and those above
    it hold what they held. When the removed Add is that lowest one, its other operand (which holds
    ``into``) takes over its output name."""
    leaf_path, into_path = _path_to_root(view, leaf), _path_to_root(view, into)
    common = next(add for add in into_path if add in leaf_path)
    changed = [into] + [view.nodes[a].output[0] for a in into_path[: into_path.index(common)]]
    changed += [view.nodes[a].output[0] for a in leaf_path[1 : leaf_path.index(common)]]
    for value in changed:
        _rename(view, value)
    add = leaf_path[0]
    node = view.nodes[add]
    other = node.input[1] if node.input[0] == leaf else node.input[0]
    out = node.output[0]
    parent = _parent_add(view, add)
    view.remove_node(add)
    if add != common:
        view.redirect_input(parent, list(view.nodes[parent].input).index(out), other)
        return
    # ``other`` now holds the whole sum the removed Add computed: a tree Add or the Conv ``into``,
    # read only by the removed Add, so it can take over the name.
    producer = view.producer_of(other)
    if producer is None or view.readers(other) or view.is_graph_output(other):
        raise RuntimeError(f"cannot take '{leaf}' out of the sum written to '{out}'")
    view.rename_output(producer, list(view.nodes[producer].output).index(other), out)
