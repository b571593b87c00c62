"""The fold pass: remove every exactly-foldable inference BatchNormalization, report the rest.

``fold(model)`` copies the model, then for the main graph and, recursively, every If/Loop/Scan
body: reduces each BN to its per-channel affine map (``bnfold.folding.screening.inference_batch_norm``),
offers it to the rules (backward folds into the producing layer first, then forward folds into the reading
layer), applies the first exact match, and repeats until nothing changes (a BN can become
foldable after another fold, e.g. Conv -> BN -> BN). Tensors the folds no longer need are
deleted. ``FoldReport`` puts every BN in exactly one of ``folded`` / ``remaining`` (with a reason
code and one sentence) and describes its attachment in ``bn_nodes``; ``inspect`` returns the same
report without handing out the folded model.

Between BN folds, the Convs of one input that an Add tree sums (multi-branch RepVGG / MobileOne
blocks) are merged into one Conv (``rules.conv_branches``) once no BN fold applies any more; a
merge can let another BN fold, so the two alternate until neither changes anything. Merges are
reported in ``FoldReport.merged``, Adds of such Convs that stay apart in ``FoldReport.unmerged``.
"""

from __future__ import annotations

import os

import onnx

from bnfold.folding.cleanup import remove_unused
from bnfold.folding.report import (
    BATCH_NORM_KIND,
    CHAIN_KIND,
    GRAPH_OUTPUT_OP,
    BNInfo,
    FoldedBN,
    FoldReport,
    MergedConvs,
    RemainingBN,
    UnmergedAdd,
)
from bnfold.folding.rules import (
    add_tree,
    affine,
    bn_branch,
    bn_conv,
    bn_duplicate,
    bn_gemm,
    bn_layout_gemm,
    bn_layout_matmul,
    bn_matmul,
    conv_bn,
    conv_branches,
    convtranspose_bn,
    gemm_bn,
    gemm_layout_bn,
    matmul_bn,
    matmul_layout_bn,
)
from bnfold.folding.rules.affine import chain_ends
from bnfold.folding.rules.base import chain_variable_operand
from bnfold.folding.rules.protocol import BatchNorm, ChainRule, Failure, Match, Reason, Rule
from bnfold.folding.screening import inference_batch_norm, variance_outlier_channels
from bnfold.folding.tensors import FLOAT_TYPES
from bnfold.folding.view import GraphView, ModelContext, is_batch_norm, iter_graphs, node_subgraphs
from bnfold.io import load_model_deferred, read_as_ir4_if_initializers_unlisted

# A repeated BN goes first: removing it never loses a fold, and it can free the first one's
# input of a second reader, so that it folds backward.
DEDUPLICATION_RULES: tuple[Rule, ...] = (bn_duplicate.RULE,)
BACKWARD_RULES: tuple[Rule, ...] = (conv_bn.RULE, convtranspose_bn.RULE, gemm_bn.RULE, matmul_bn.RULE)
# An identity-branch BN folds sideways, into a Conv of its own input that the same Adds sum.
BRANCH_RULES: tuple[Rule, ...] = (bn_branch.RULE,)
FORWARD_RULES: tuple[Rule, ...] = (bn_gemm.RULE, bn_matmul.RULE, bn_conv.RULE)
# Through Flatten / Reshape / Transpose / Squeeze / Unsqueeze (rules/layout.py): tried after the
# direct folds of each direction, which they never overlap (they need at least one layout op).
BACKWARD_RULES += (matmul_layout_bn.RULE, gemm_layout_bn.RULE)
FORWARD_RULES += (bn_layout_gemm.RULE, bn_layout_matmul.RULE)
BN_RULES = DEDUPLICATION_RULES + BACKWARD_RULES + BRANCH_RULES + FORWARD_RULES
# Decomposed BNs: offered the end node of a per-channel affine chain, after the BNs of each round.
AFFINE_RULES: tuple[ChainRule, ...] = affine.RULES
AFFINE_FORWARD_RULES: tuple[ChainRule, ...] = affine.FORWARD_RULES
# Not BN folds: offered each root Add of an Add tree once no BN fold applies.
MERGE_RULES = (conv_branches.RULE,)

RULE_CODES = tuple(r.name for r in BN_RULES + AFFINE_RULES + AFFINE_FORWARD_RULES + MERGE_RULES)
REASON_CODES = tuple(reason.value for reason in Reason)


def fold(model_or_path, *, forward: bool = True):
    """Fold every exactly-foldable BatchNormalization; return ``(new ModelProto, FoldReport)``.

    ``model_or_path``: an ``onnx.ModelProto`` (never modified) or a path (loaded with
    ``bnfold.io.load_model``, external data included). ``forward``: also fold a BN into the
    Gemm/MatMul/unpadded Conv that reads it when nothing before it can take it.
    """
    return _fold(model_or_path, forward, complete_model=True)


def _fold(model_or_path, forward: bool, complete_model: bool):
    if not isinstance(forward, bool):
        raise TypeError(f"forward must be a bool, got {type(forward).__name__}")
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        read_as_ir4_if_initializers_unlisted(model, "the model")
        payloads, wait_for_check = None, None
    else:
        # Freshly loaded: ours to edit, no copy needed; the checker runs while we fold, and the
        # weights are copied into the proto once, after folding (see fold_file for no copy).
        model, payloads, wait_for_check = load_model_deferred(model_or_path)
    report = FoldReport()
    try:
        flushed = _run(model, report, forward, payloads)
        if payloads is not None and complete_model:
            payloads.materialize(model.graph.initializer)
        report.flushed_subnormals = flushed.total()  # inspect: products counted, never kept
    finally:
        if payloads is not None:
            payloads.close()
        if wait_for_check is not None:
            wait_for_check()  # an invalid model is reported as such, whatever folding made of it
    return model, report


def fold_file(input_path, output_path, *, forward: bool = True, verify=None, write_refused: bool = False) -> FoldReport:
    """Fold the model at ``input_path`` and write the result to ``output_path``; return the report.

    What ``bnfold fold`` does, and the fastest way to fold a file: the weights are never copied
    into protobuf (they are read from the memory-mapped input and the new ones written straight
    to the output, see ``bnfold.io.payloads``). The output is written atomically and never over the
    input or its external data. ``verify(tmp_path) -> bool`` is called with the complete result
    in a temporary file before it is moved into place; when it returns False nothing is written
    (``bnfold fold`` runs its parity check there).

    When ``verify`` refuses a result in which BNs were folded into float16 / bfloat16 weights,
    the fold is tried again leaving the first k of those BNs (in graph order) unfolded, for the
    smallest k that ``verify`` accepts (bisection, assuming that leaving more BNs unfolded never
    hurts): each folded weight is rounded once to its type, and in a deep network the rounding
    of early layers is amplified by every layer after them. Those BNs are reported as remaining
    with reason ``would_lose_precision``; the rest are folded. If no k helps, the result of
    folding everything is the one verify saw last (and refused).

    ``write_refused=True`` (``--force``): the search runs all the same, but what verify saw last
    is written even when it refused it.
    """
    from bnfold.io import check_output_path

    for name, value in (("forward", forward), ("write_refused", write_refused)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    for name, value in (("input_path", input_path), ("output_path", output_path)):
        if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str):
            raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    check_output_path(output_path, source_path=input_path)
    verdicts = []

    def recording(tmp_path, report=None):
        verdicts.append(verify is None or bool(verify(tmp_path)))
        return verdicts[-1]

    def low_precision_folds(report):
        return [(f.graph, f.bn) for f in report.folded if f.weight_type in ("float16", "bfloat16")]

    def last_word(tmp_path, report=None):
        return recording(tmp_path) or write_refused

    def first_try(tmp_path, report):
        # Written at once when it passes, or when it is refused and no search could follow.
        return recording(tmp_path) or (write_refused and not low_precision_folds(report))

    report = _fold_file_once(input_path, output_path, forward, first_try, {})
    if verdicts[-1]:
        return report
    low_precision = low_precision_folds(report)
    if not low_precision:
        return report

    def kept(k):
        def message(bn, n_before):
            others = f" and the {n_before} BN(s) before it" if n_before else ""
            return (
                f"with BatchNormalization '{bn}'{others} folded into float16/bfloat16 weights the model failed "
                "the parity check: each folded weight is rounded once to its type, and the rounding of early "
                "layers is amplified by the layers after them; left unfolded (the later BNs are folded)"
            )

        return {
            key: Failure(Reason.WOULD_LOSE_PRECISION, message(key[1], n)) for n, key in enumerate(low_precision[:k])
        }

    def passes(k):  # verify's verdict on the fold that keeps the first k, without writing it
        _fold_file_once(input_path, output_path, forward, lambda tmp, report: recording(tmp) and False, kept(k))
        return verdicts[-1]

    if not passes(len(low_precision)):
        # Folding is not what fails: give verify the full fold again, as the caller's last word.
        return _fold_file_once(input_path, output_path, forward, last_word, {})
    failing, passing = 0, len(low_precision)
    while passing - failing > 1:
        middle = (failing + passing) // 2
        if passes(middle):
            passing = middle
        else:
            failing = middle
    return _fold_file_once(input_path, output_path, forward, last_word, kept(passing))


def _fold_file_once(input_path, output_path, forward, verify, keep) -> FoldReport:
    from bnfold.io import save_model_atomic

    model, payloads, wait_for_check = load_model_deferred(input_path)
    try:
        report = FoldReport()
        try:
            flushed = _run(model, report, forward, payloads, keep)
        except BaseException:
            wait_for_check()  # an invalid model is reported as such, whatever folding made of it
            raise

        def checked_then_verified(tmp_path):
            # The checker of the input runs on while the result is written to a temporary file;
            # nothing reaches output_path before it has passed.
            wait_for_check()
            # The big products were computed (and their subnormals flushed) as they were written.
            report.flushed_subnormals = flushed.total()
            return verify(tmp_path, report)

        save_model_atomic(model, output_path, source_path=input_path, payloads=payloads, verify=checked_then_verified)
        report.flushed_subnormals = flushed.total()
    finally:
        payloads.close()
    return report


def inspect(model_or_path, *, forward: bool = True) -> FoldReport:
    """What ``fold`` would do, without writing anything: the report, ``bn_nodes`` included."""
    return _fold(model_or_path, forward, complete_model=False)[1]


def _run(model: onnx.ModelProto, report: FoldReport, forward: bool, payloads=None, keep=None):
    """Fold ``model`` in place into ``report``. ``keep``: {(graph path, BN label): Failure} of BNs
    to leave as they are, with that outcome (see ``fold_file``'s precision search). Returns the
    ``FlushedSubnormals`` of the tensors the folds wrote, whose ``total()`` goes into
    ``report.flushed_subnormals`` once the deferred products have been written."""
    report.ops_before = op_counts(model)
    ctx = ModelContext(model, payloads)
    released, vanished = set(), set()
    _fold_graph(model.graph, ctx, "", None, forward, report, released, vanished, keep or {})
    remove_unused(model, released, vanished)
    report.ops_after = op_counts(model)
    return ctx.flush_written_subnormals()


def op_counts(model: onnx.ModelProto) -> dict:
    """Number of nodes of each op type in the model, nested bodies included."""
    counts: dict = {}
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _fold_graph(graph, ctx, path, parent, forward, report, released, vanished, keep) -> None:
    view = GraphView(graph, ctx, path, parent)
    bn_indices = [i for i, n in enumerate(view.nodes) if is_batch_norm(n)]
    attachments = {i: _attachment(view, i) for i in bn_indices}
    outliers = {i: variance_outlier_channels(view, i) for i in bn_indices}  # of the original statistics
    outcome: dict[int, Match | Failure] = {}
    pending = []
    for i in bn_indices:
        kept = keep.get((path, view.labels[i]))
        if kept is not None:
            outcome[i] = kept
        else:
            pending.append(i)
    # Decomposed BNs (per-channel affine chains without a BN node), by chain end: the folds made
    # (with the chain's attachment before it), and the ones the precision search keeps.
    chains_folded: dict[int, tuple[Match, tuple]] = {}
    chains_kept: dict[int, Failure] = {}
    merges, merge_failures, weight_types = [], {}, {}
    while True:
        changed = True
        while changed:
            changed = False
            for i in list(pending):
                result = _evaluate(view, i, forward)
                if isinstance(result, Match):
                    result.rewrite()
                    weight_types[i] = _weight_type(view, result)
                    pending.remove(i)
                    changed = True
                outcome[i] = result
            for end in chain_ends(view):
                if end in chains_kept:
                    continue
                kept = keep.get((path, view.labels[end]))
                if kept is not None:
                    chains_kept[end] = kept
                    continue
                result = _evaluate_chain(view, end, forward)
                if result is not None:
                    attachment = _chain_attachment(view, end, result)
                    result.rewrite()
                    weight_types[end] = _weight_type(view, result)
                    chains_folded[end] = (result, attachment)
                    changed = True
        # The failures of the last round, in which nothing merged, are the final word.
        merged_now, merge_failures = _merge_branches(view)
        if not merged_now:
            break
        merges += merged_now
    for merge, root in merges:
        report.merged.append(
            MergedConvs(merge.rule, tuple(view.labels[c] for c in merge.convs), view.labels[merge.target], root, path)
        )
    for root, (convs, failure) in merge_failures.items():
        report.unmerged.append(UnmergedAdd(view.labels[root], convs, failure.reason.value, failure.message, path))
    # In graph order, BNs and chains together: fold_file's precision search leaves the first k of
    # the float16 / bfloat16 folds unfolded, and the early layers are the ones to leave first.
    for i in sorted(set(bn_indices) | set(chains_folded) | set(chains_kept)):
        if i in chains_folded:
            result, attachment = chains_folded[i]
            _report_outcome(view, i, path, result, attachment, weight_types[i], CHAIN_KIND, report)
        elif i in chains_kept:
            result = chains_kept[i]
            report.remaining.append(RemainingBN(view.labels[i], result.reason.value, result.message, path, CHAIN_KIND))
        else:
            _report_outcome(
                view, i, path, outcome[i], attachments[i], weight_types.get(i, ""), BATCH_NORM_KIND, report, outliers[i]
            )
    for i, node in enumerate(view.nodes):
        if i in view.removed:
            continue
        for suffix, sub in node_subgraphs(node):
            sub_path = f"{view.labels[i]}/{suffix}" if not path else f"{path}/{view.labels[i]}/{suffix}"
            _fold_graph(sub, ctx, sub_path, view, forward, report, released, vanished, keep)
    released |= view.released
    vanished |= view.vanished
    view.commit()


def _weight_type(view: GraphView, result: Match) -> str:
    """The element type of the weight a fold wrote (read right after its rewrite: a later branch
    merge may remove the target, its weights joining another Conv's)."""
    # A removed duplicate changed no weights: nothing for the precision search to undo.
    if result.rule == bn_duplicate.RULE.name:
        return ""
    return FLOAT_TYPES.get(view.constant_type(view.nodes[result.target].input[1]), "")


def _report_outcome(
    view: GraphView, index: int, path: str, result, attachment, weight_type: str, kind: str, report, outliers=()
) -> None:
    """Put node ``index`` (a BN, or a chain end) in ``report.folded`` or ``report.remaining``, and
    describe it in ``report.bn_nodes``; ``outliers``: its variance-outlier channels."""
    label = view.labels[index]
    if isinstance(result, Match):
        target = view.labels[result.target]
        absorbed = tuple(view.labels[k] for k in result.absorbed)
        report.folded.append(FoldedBN(label, result.rule, target, path, absorbed, weight_type, kind, outliers))
        foldable, code = True, result.rule
        message = f"folded into {view.describe(result.target)} by rule {result.rule}"
        if result.absorbed:
            message += " together with " + ", ".join(view.describe(k) for k in result.absorbed)
    else:
        # The report holds plain strings, as it always has: a Reason member is only equal to one.
        code, message = result.reason.value, result.message
        report.remaining.append(RemainingBN(label, code, message, path, kind))
        foldable = False
    report.bn_nodes.append(BNInfo(label, path, *attachment, foldable, code, message, kind, outliers))


def _evaluate_chain(view: GraphView, end: int, forward: bool) -> Match | None:
    """The first affine rule that folds the chain ending at node ``end``, or None: a chain that
    does not fold is not reported (it need not be a BN at all)."""
    for rule in AFFINE_RULES + (AFFINE_FORWARD_RULES if forward else ()):
        result = rule.check(view, end)
        if isinstance(result, Match):
            return result
    return None


def _chain_attachment(view: GraphView, end: int, match: Match):
    """``_attachment`` of a chain: the producer of its first node's variable input, the readers of its end."""
    head = view.nodes[match.absorbed[0] if match.absorbed else end]
    x = head.input[0] if head.op_type == "Identity" else head.input[chain_variable_operand(view, head)]
    producer = view.producer_of(x)
    producer_op = view.nodes[producer].op_type if producer is not None else ""
    producer_label = view.labels[producer] if producer is not None else ""
    _, _, consumer_ops, consumers = _attachment(view, end)
    return producer_op, producer_label, consumer_ops, consumers


def _merge_branches(view: GraphView):
    """Apply every branch merge the current graph allows: ``([(Merge, root Add label)], {root
    index: (Conv labels, Failure)})``."""
    merged, failures = [], {}
    for index in range(len(view.nodes)):
        if not add_tree.is_root(view, index):
            continue
        for rule in MERGE_RULES:
            result = rule.check(view, index)
            if isinstance(result, conv_branches.Merge):
                label = view.labels[index]  # read before the rewrite: it may remove the root
                result.rewrite()
                merged.append((result, label))
                break
            if isinstance(result, Failure):
                leaves = add_tree.tree_leaves(view, index)
                convs = [
                    c
                    for group in add_tree.conv_leaves_by_input(view, leaves).values()
                    if len(group) >= 2
                    for c in group
                ]
                failures[index] = (tuple(view.labels[c] for c in convs), result)
                break
    return merged, failures


def _attachment(view: GraphView, index: int):
    node = view.nodes[index]
    producer = view.producer_of(node.input[0]) if node.input else None
    producer_op = view.nodes[producer].op_type if producer is not None else ""
    producer_label = view.labels[producer] if producer is not None else ""
    y = node.output[0] if node.output else ""
    readers = view.readers(y) if y else []
    consumer_ops = [view.nodes[r].op_type for r in readers]
    consumers = [view.labels[r] for r in readers]
    if y and view.is_graph_output(y):
        consumer_ops.append(GRAPH_OUTPUT_OP)
        consumers.append(y)
    return producer_op, producer_label, tuple(consumer_ops), tuple(consumers)


def _evaluate(view: GraphView, index: int, forward: bool):
    bn = inference_batch_norm(view, index)
    if isinstance(bn, Failure):
        return bn
    failures = []
    for rule in BN_RULES:
        result = rule.check(view, bn)
        if result is None:
            continue
        if isinstance(result, Match):
            if rule in FORWARD_RULES and not forward:
                failures.append(
                    Failure(
                        Reason.NO_FOLDABLE_NEIGHBOUR,
                        f"BatchNormalization '{bn.label}' could fold forward into "
                        f"{view.describe(result.target)}, but forward folding is disabled",
                    )
                )
                continue
            return result
        failures.append(result)
    if failures:
        return failures[0]
    return Failure(Reason.NO_FOLDABLE_NEIGHBOUR, _no_neighbour_sentence(view, bn))


def _no_neighbour_sentence(view: GraphView, bn: BatchNorm) -> str:
    producer = view.producer_of(bn.x)
    before = view.describe(producer) if producer is not None else f"input '{bn.x}'"
    readers = view.readers(bn.y)
    after = ", ".join(view.describe(r) for r in readers) or "nothing"
    if view.is_graph_output(bn.y):
        after = f"{after} and the graph output" if readers else "the graph output"
    return (
        f"BatchNormalization '{bn.label}' follows {before} and feeds {after}; no Conv, ConvTranspose, Gemm "
        "or MatMul is attached in a foldable way"
    )
