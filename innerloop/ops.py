"""Ops: the test-time-regression family as functions, like FLA's ops.

``innerloop.ops.scan(q, k, v, lr, ...)`` regresses an inner model online on ``k -> v`` and reads it
with ``q``; the choice of inner model, update rule, mini-batch size, decay and momentum gives linear
attention, DeltaNet, Gated DeltaNet, TTT-Linear/MLP, Titans and the rest of the family (see
docs/family.md). It is the path ``TTTLayer`` runs (``innerloop.core.ops``).
"""

from innerloop.core.ops import PartialWeights, Weights, scan

__all__ = ["PartialWeights", "Weights", "scan"]
