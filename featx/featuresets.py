"""Feature sets: pooled layers (of one or several backbones) concatenated into one matrix.

A feature set is written ``stage4+pre_logits`` (every layer with each requested pooling),
``stage4/spp+pre_logits/avg`` (a pooling per layer), and named by its blocks:
``stage4/spp+pre_logits/avg``, or ``efficientnet_lite0:pre_logits/avg+efficientnet_lite2:pre_logits/avg``
across backbones. Concatenated blocks are standardised by :class:`featx.heads.BlockScaler`
*inside* the head's pipeline, so only training folds ever set the scaling. This module imports
neither torch nor scikit-learn (a warm comparison reads its names without them).
"""

from __future__ import annotations

from collections.abc import Sequence

from featx.exceptions import FeatxError
from featx.paths import split_names

__all__ = ["VECTOR_POOLING", "collapse_vector_poolings", "parse_blocks", "parse_feature_sets", "set_name", "split_names"]

Pair = tuple[str, str]


def parse_feature_sets(layers, poolings, *, all_layers: Sequence[str] = ()) -> list[tuple[Pair, ...]]:
    """Expand layer specifications into feature sets, each a tuple of ``(layer, pooling)`` blocks.

    Parameters
    ----------
    layers : str or sequence of str
        Comma-separated (or listed) entries; an entry is a layer (``stage4``), a layer with its
        pooling (``stage4/spp``), ``all``, or several of these joined by ``+`` (one concatenated set).
    poolings : str or sequence of str
        Poolings for the blocks that name none: one feature set per pooling.
    all_layers : sequence of str, default=()
        What ``all`` stands for (the backbone's layers).

    Returns
    -------
    list of tuple of (str, str)
        One entry per feature set, in the order given, duplicates dropped.

    Raises
    ------
    FeatxError
        For an empty entry or block, or a block with more than one ``/``.

    Examples
    --------
    >>> parse_feature_sets("stage3,stage4+pre_logits", "avg,spp")
    [(('stage3', 'avg'),), (('stage3', 'spp'),), (('stage4', 'avg'), ('pre_logits', 'avg')), (('stage4', 'spp'), ('pre_logits', 'spp'))]
    >>> parse_feature_sets("stage4/spp+pre_logits/avg", "avg")
    [(('stage4', 'spp'), ('pre_logits', 'avg'))]
    """
    pools = split_names(poolings)
    if not pools:
        raise FeatxError("No pooling given: expected one or more of avg, max, avgmax, spp.")
    sets: list[tuple[Pair, ...]] = []
    for entry in split_names(layers):
        parts = entry.split("+")
        if entry == "all":
            for layer in all_layers:
                sets += [((layer, p),) for p in pools]
            continue
        blocks = []
        for part in parts:
            pieces = part.strip().split("/")
            if not pieces[0] or len(pieces) > 2 or (len(pieces) == 2 and not pieces[1]):
                raise FeatxError(
                    f"Cannot read the layer {part!r} in {entry!r}: expected LAYER or LAYER/POOLING, joined by '+' "
                    f"for a concatenation, e.g. 'stage4/spp+pre_logits/avg'."
                )
            blocks.append(pieces)
        if all(len(b) == 2 for b in blocks):
            sets.append(tuple((b[0], b[1]) for b in blocks))
        else:
            sets += [tuple((b[0], b[1] if len(b) == 2 else p) for b in blocks) for p in pools]
    unique = list(dict.fromkeys(tuple(dict.fromkeys(s)) for s in sets))
    if not unique:
        raise FeatxError("No layer given: expected one or more layer names, 'all', or layers joined by '+'.")
    return unique


#: The pooling a feature set names for a layer that is already a vector (``pre_logits``, ``logits``):
#: every pooling passes such a layer through unchanged (:mod:`featx.pooling`).
VECTOR_POOLING = "avg"


def collapse_vector_poolings(sets: Sequence[tuple[Pair, ...]],
                             vectors: Sequence[str]) -> tuple[list[tuple[Pair, ...]], dict[str, list[str]]]:
    """Give the layers that are already vectors one pooling, and drop the feature sets that became equal.

    Pooling does not apply to a vector (``pre_logits``: every pooling returns it unchanged), so
    ``pre_logits/spp`` holds the very features of ``pre_logits/avg``; comparing both would score
    one feature set twice. Their blocks are named with :data:`VECTOR_POOLING`.

    Parameters
    ----------
    sets : sequence of tuple of (layer, pooling)
        Feature sets, as :func:`parse_feature_sets` returns them.
    vectors : sequence of str
        The layers whose output is a vector.

    Returns
    -------
    sets : list of tuple of (layer, pooling)
        In the order given, duplicates dropped.
    replaced : dict of str to list of str
        Per vector layer, the poolings given for it other than :data:`VECTOR_POOLING` (what a
        note to the user names); empty when nothing was replaced.

    Examples
    --------
    >>> sets = parse_feature_sets("stage4,pre_logits", "avg,spp")
    >>> collapse_vector_poolings(sets, ["pre_logits"])
    ([(('stage4', 'avg'),), (('stage4', 'spp'),), (('pre_logits', 'avg'),)], {'pre_logits': ['spp']})
    """
    vectors = set(vectors)
    replaced: dict[str, list[str]] = {}
    collapsed = []
    for pairs in sets:
        for layer, pooling in pairs:
            if layer in vectors and pooling != VECTOR_POOLING and pooling not in replaced.setdefault(layer, []):
                replaced[layer].append(pooling)
        collapsed.append(tuple(dict.fromkeys((layer, VECTOR_POOLING if layer in vectors else pooling)
                                             for layer, pooling in pairs)))
    return list(dict.fromkeys(collapsed)), {layer: p for layer, p in replaced.items() if p}


def parse_blocks(layers, poolings, *, all_layers: Sequence[str] = ()) -> list[Pair]:
    """The distinct ``(layer, pooling)`` blocks of :func:`parse_feature_sets`, in order: what one
    extraction must compute for all those feature sets (or for one concatenated transformer output).

    Examples
    --------
    >>> parse_blocks("stage2/spp+pre_logits", "avg,max")
    [('stage2', 'spp'), ('pre_logits', 'avg'), ('pre_logits', 'max')]
    >>> parse_blocks(["stage1", "all"], ["avg"], all_layers=["stage1", "stage2"])
    [('stage1', 'avg'), ('stage2', 'avg')]
    """
    sets = parse_feature_sets(layers, poolings, all_layers=all_layers)
    return list(dict.fromkeys(block for blocks in sets for block in blocks))


def set_name(pairs: Sequence[Pair], backbones: Sequence[str] | None = None) -> str:
    """The name of a feature set: blocks ``layer/pooling`` joined by ``+``, each prefixed by its
    backbone when ``backbones`` (one per block) is given.

    Examples
    --------
    >>> set_name([("stage4", "avg"), ("pre_logits", "avg")])
    'stage4/avg+pre_logits/avg'
    >>> set_name([("pre_logits", "avg")] * 2, ["efficientnet_lite0", "efficientnet_lite2"])
    'efficientnet_lite0:pre_logits/avg+efficientnet_lite2:pre_logits/avg'
    """
    if backbones is None:
        return "+".join(f"{layer}/{pooling}" for layer, pooling in pairs)
    return "+".join(f"{b}:{layer}/{pooling}" for b, (layer, pooling) in zip(backbones, pairs))
