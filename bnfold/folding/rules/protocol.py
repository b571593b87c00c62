"""What a fold rule is and what it answers: the ``Rule`` protocol, the BN it is offered
(``BatchNorm``), and its two answers, ``Match`` and ``Failure`` with a ``Reason`` code.

Every rule module defines ``RULE``, an object satisfying ``Rule``: a ``name`` (the rule code the
report shows) and ``check(view, bn) -> Match | Failure | None``:

* ``None``     the pattern does not apply (e.g. the BN's producer is not a Conv);
* ``Failure``  the pattern applies but folding would not be exact or safe: a ``Reason`` from the
               public list plus one sentence naming the nodes involved;
* ``Match``    folding is exact; ``Match.rewrite()`` performs it on the view.

``BatchNorm`` carries an inference-mode BN reduced to its per-channel affine map
``y = s * x + t`` with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``, computed in
float64 from the BN's constant parameters (see ``bnfold.folding.screening``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from bnfold.folding.view import GraphView


class Reason(str, enum.Enum):
    """Why a BN stays: the reason codes of ``RemainingBN.reason`` (docs/fold.md lists them).

    A member is its code: it equals the plain string, and ``str()``, f-strings and ``json``
    give the code itself on every Python version (3.11 changed ``format()`` of mixed-in enums
    to show ``Reason.NAME``; the two methods below keep the code)."""

    TRAINING_MODE = "training_mode"
    NON_CONSTANT_PARAMS = "non_constant_params"
    NON_CONSTANT_WEIGHT = "non_constant_weight"
    GRAPH_OUTPUT = "graph_output"
    MULTIPLE_CONSUMERS = "multiple_consumers"
    NOT_PER_CHANNEL = "not_per_channel"
    PADDED_CONV = "padded_conv"
    MATMUL_LAYOUT = "matmul_layout"
    UNKNOWN_RANK = "unknown_rank"
    SPATIAL_MODE = "spatial_mode"
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    INVALID_STATISTICS = "invalid_statistics"
    WOULD_OVERFLOW = "would_overflow"
    WOULD_LOSE_PRECISION = "would_lose_precision"
    NO_FOLDABLE_NEIGHBOUR = "no_foldable_neighbour"
    # Summed branches (bn_branch, conv_branches): why a branch does not join its sibling Conv.
    INCOMPATIBLE_BRANCHES = "incompatible_branches"
    MISALIGNED_BRANCHES = "misaligned_branches"

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass
class Failure:
    """The pattern applies but the fold is refused: a reason code and one sentence."""

    reason: Reason
    message: str

    def __post_init__(self) -> None:
        self.reason = Reason(self.reason)  # a code outside the public list is a bug: ValueError


@dataclass
class Match:
    rule: str
    target: int  # index of the layer node the BN folds into
    rewrite: Callable[[], None]
    absorbed: list[int] = field(default_factory=list)  # chain nodes folded along with the BN


@dataclass
class BatchNorm:
    """An inference BN seen by the rules: node index, names and its float64 affine map."""

    index: int
    label: str
    x: str
    y: str
    scale: np.ndarray  # s, float64 (C,)
    shift: np.ndarray  # t, float64 (C,)

    @property
    def channels(self) -> int:
        return self.scale.shape[0]


class Rule(Protocol):
    """A fold rule: its code, and the check that matches it against one BN."""

    name: str

    def check(self, view: GraphView, bn: BatchNorm) -> Match | Failure | None: ...


class ChainRule(Protocol):
    """A rule for a decomposed BN (``rules/affine.py``): offered the index of the last node of a
    per-channel affine chain instead of a BN."""

    name: str

    def check(self, view: GraphView, end: int) -> Match | Failure | None: ...
