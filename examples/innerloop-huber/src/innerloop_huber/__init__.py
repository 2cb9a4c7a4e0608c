"""innerloop-huber: an example third-party plugin adding the ``huber`` inner loss to innerloop."""

from innerloop_huber.plugin import HuberReconstruction

__all__ = ["HuberReconstruction"]
