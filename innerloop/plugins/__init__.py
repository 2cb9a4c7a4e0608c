"""Built-in plugins. They register through the same hooks, and the same path, as third-party ones."""

DEFAULT_PLUGINS: list[str] = [
    "innerloop.plugins.models.linear",
    "innerloop.plugins.models.mlp",
    "innerloop.plugins.models.matrix",
    "innerloop.plugins.losses.reconstruction",
    "innerloop.plugins.losses.next_token",
    "innerloop.plugins.losses.dot_product",
    "innerloop.plugins.optimizers.minibatch_gd",
    "innerloop.plugins.optimizers.dual_form",
    "innerloop.plugins.optimizers.momentum",
    "innerloop.plugins.kernels",
    "innerloop.plugins.e2e",
]
