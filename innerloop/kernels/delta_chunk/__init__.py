"""The delta rule (DeltaNet, Gated DeltaNet) in chunks: the training path without a loop over tokens.

:func:`chunk_delta_rule` is the chunked (WY / UT) form, :func:`delta_rule_loop` the token loop it must
equal; README.md in this folder derives the one from the other. :func:`kernel_spec` is its registration
as the ``dual_form`` fast path of the ``matrix`` inner model at ``mini_batch_size=1`` (``adapter.py``).
"""

from innerloop.kernels.delta_chunk.adapter import delta_rule_kernel_forward, kernel_spec, verify
from innerloop.kernels.delta_chunk.chunk import chunk_delta_rule
from innerloop.kernels.delta_chunk.naive import delta_rule_loop

__all__ = ["chunk_delta_rule", "delta_rule_kernel_forward", "delta_rule_loop", "kernel_spec", "verify"]
