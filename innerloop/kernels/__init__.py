"""Fast paths, each beside the pure-torch reference it must equal. See kernels/README.md."""

from innerloop.kernels.spec import KernelInputs, KernelSpec

__all__ = ["KernelInputs", "KernelSpec"]
