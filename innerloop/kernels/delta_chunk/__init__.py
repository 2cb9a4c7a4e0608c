"""The delta rule (DeltaNet, Gated DeltaNet) in chunks: the training path without a loop over tokens.

:func:`chunk_delta_rule` is the chunked (WY / UT) form, :func:`delta_rule_loop` the token loop it must
equal; README.md in this folder derives the one from the other.
"""

from innerloop.kernels.delta_chunk.chunk import chunk_delta_rule
from innerloop.kernels.delta_chunk.naive import delta_rule_loop

__all__ = ["chunk_delta_rule", "delta_rule_loop"]
