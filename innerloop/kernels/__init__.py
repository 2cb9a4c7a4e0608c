"""Fast paths, each beside the pure-torch reference it must equal. See kernels/README.md."""

from innerloop.kernels.dispatch import KernelCheckError, KernelUnavailableError
from innerloop.kernels.first_use import KernelCheckWarning
from innerloop.kernels.spec import KernelInputs, KernelSpec

__all__ = ["KernelCheckError", "KernelCheckWarning", "KernelInputs", "KernelSpec", "KernelUnavailableError"]
