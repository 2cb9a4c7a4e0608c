"""Review s56f: Lightning training -- trainer settings, metrics and resume."""

from __future__ import annotations

from typing import Any

import pytest

from innerloop.config.load import ConfigError, _required_parameters, load_config


class _NeedsADevice:
    def __init__(self, device: str, debug: bool = False) -> None:
        self.device, self.debug = device, debug


class _DeprecatedAlias(_NeedsADevice):
    """As Lightning's graveyard ``SingleTPUStrategy``: only ``*args, **kwargs``, passed to its base."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


def test_a_class_of_args_and_kwargs_needs_what_its_base_needs() -> None:
    assert _required_parameters(_NeedsADevice) == ("device",)
    assert _required_parameters(_DeprecatedAlias) == ("device",)


@pytest.mark.slow
def test_a_strategy_that_needs_a_device_is_refused_by_name() -> None:
    """``single_tpu`` (Lightning's deprecated alias of ``single_xla``, a class of ``*args, **kwargs``)
    needs a device, as ``single_xla`` does: it was listed as valid and the run crashed with a bare
    ``TypeError: SingleDeviceXLAStrategy.__init__() missing 1 required positional argument``. Slow
    only for Lightning's first import in the worker (about 11 s on a loaded 2-core machine; the check
    itself 0.5 s)."""
    with pytest.raises(ConfigError, match=r"trainer.strategy='single_tpu' is not valid; valid: \[.*'ddp'"):
        load_config("tiny", ["trainer.strategy=single_tpu"])  # it validates the run
