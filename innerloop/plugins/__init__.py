"""Built-in plugins. They register through the same hooks, and the same path, as third-party ones."""

DEFAULT_PLUGINS: tuple[str, ...] = (
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
)
"""The modules of innerloop's own plugins, loaded in this order. Membership makes a plugin built in (its
update rules skip the naive-loop check, which the test suite makes instead): a tuple, so that it cannot grow."""
