"""The fold pass's report: one entry per BN, folded (``FoldedBN``) or remaining (``RemainingBN``,
with a reason code and one sentence), and ``BNInfo`` describing where each BN sits; ``FoldReport``
holds them with the op counts before and after, the summed Conv branches merged into one
(``MergedConvs``) or left apart (``UnmergedAdd``) and the number of subnormals flushed, as a dict
or a JSON file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from bnfold.io import write_json_atomic

GRAPH_OUTPUT_OP = "<graph output>"
# What an entry describes: a BatchNormalization node, or a decomposed BN (a per-channel affine
# chain of constant Mul / Add / Sub / Div without a BN node), named by the chain's last node.
BATCH_NORM_KIND = "BatchNormalization"
CHAIN_KIND = "affine_chain"


@dataclass(frozen=True)
class FoldedBN:
    """A BN that was folded: ``rule`` code, ``target`` layer label, ``graph`` path ("" = main)."""

    bn: str
    rule: str
    target: str
    graph: str
    absorbed: tuple = ()  # labels of Add/Mul/Sub/Div nodes folded along with the BN
    weight_type: str = ""  # element type of the target layer's weight ("float32", "float16", ...)
    kind: str = BATCH_NORM_KIND  # or CHAIN_KIND: ``bn`` is then the chain's last node
    # channels whose running variance sets their scale far above the BN's others (see BNInfo)
    outlier_channels: tuple = ()


@dataclass(frozen=True)
class RemainingBN:
    """A BN that stays, with a machine-readable ``reason`` code and a one-sentence ``message``."""

    bn: str
    reason: str
    message: str
    graph: str
    kind: str = BATCH_NORM_KIND


@dataclass(frozen=True)
class BNInfo:
    """Where a BN sits in the original model and what the pass does with it (for ``inspect``).

    ``producer_op``/``producer`` are "" when the BN input is a graph input, initializer or an
    outer-scope value; a graph output among the readers appears as op ``"<graph output>"``.
    ``outlier_channels`` is flagged, not refused: the BN folds (or not) as it would otherwise.
    """

    bn: str
    graph: str
    producer_op: str
    producer: str
    consumer_ops: tuple
    consumers: tuple
    foldable: bool
    rule_or_reason: str
    message: str
    kind: str = BATCH_NORM_KIND
    # Channel indices whose scale gamma / sqrt(var + eps) is at least OUTLIER_SCALE_RATIO (1000)
    # times the BN's median and whose var + eps alone accounts for as much: a variance of ~0 next
    # to normal channels, which gives huge folded weights (bnfold.folding.screening, docs/fold.md).
    outlier_channels: tuple = ()


@dataclass(frozen=True)
class MergedConvs:
    """Convs of one input summed by an Add tree, merged into ``target`` by ``rule`` (``conv_branches``).

    ``convs``: every merged Conv's label, target first; ``add``: the tree's root Add."""

    rule: str
    convs: tuple
    target: str
    add: str
    graph: str


@dataclass(frozen=True)
class UnmergedAdd:
    """An Add tree summing two or more Convs of one input that stay apart: ``reason`` code, ``message``."""

    add: str
    convs: tuple
    reason: str
    message: str
    graph: str


@dataclass
class FoldReport:
    folded: list = field(default_factory=list)
    remaining: list = field(default_factory=list)
    bn_nodes: list = field(default_factory=list)
    ops_before: dict = field(default_factory=dict)  # op type -> count, all graphs, before folding
    ops_after: dict = field(default_factory=dict)
    merged: list = field(default_factory=list)  # MergedConvs: summed Conv branches made one Conv
    unmerged: list = field(default_factory=list)  # UnmergedAdd: summed Convs of one input left apart
    # Subnormal float32 / float64 / bfloat16 values of the tensors the folds wrote, flushed to zero.
    # fold_file knows the count of the big products only once they are written: it is filled in then.
    flushed_subnormals: int = 0

    @property
    def n_folded(self) -> int:
        """BatchNormalization nodes folded (decomposed BNs are counted by ``n_chains_folded``)."""
        return sum(1 for e in self.folded if e.kind == BATCH_NORM_KIND)

    @property
    def n_remaining(self) -> int:
        """BatchNormalization nodes left in the model."""
        return sum(1 for e in self.remaining if e.kind == BATCH_NORM_KIND)

    @property
    def n_chains_folded(self) -> int:
        """Decomposed BNs (per-channel affine chains without a BN node) folded."""
        return sum(1 for e in self.folded if e.kind == CHAIN_KIND)

    def to_dict(self) -> dict:
        def plain(entry):
            d = asdict(entry)
            return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

        return {
            "n_folded": self.n_folded,
            "n_remaining": self.n_remaining,
            "n_chains_folded": self.n_chains_folded,
            "folded": [plain(e) for e in self.folded],
            "remaining": [plain(e) for e in self.remaining],
            "bn_nodes": [plain(e) for e in self.bn_nodes],
            "ops_before": dict(self.ops_before),
            "ops_after": dict(self.ops_after),
            "merged": [plain(e) for e in self.merged],
            "unmerged": [plain(e) for e in self.unmerged],
            "flushed_subnormals": self.flushed_subnormals,
        }

    def to_json(self, path) -> None:
        """Write ``to_dict()`` as indented JSON to ``path``, atomically."""
        write_json_atomic(self.to_dict(), path)
