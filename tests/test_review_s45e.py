"""Review s45e: the last look at session 45's guards on a built layer and its Hugging Face changes.

The defects kept here, each a regression test seen failing without its fix:

- ``TTTLayer`` / ``CausalSelfAttention`` refused an option set to the value the layer holds when it came
  as another type the constructor takes: ``layer.rope_theta = 10000`` (the int a config holds, where
  the layer keeps ``10000.0``), ``numpy.float64`` / ``numpy.int64`` values read from an array or a
  saved config. Such a set is taken, and the layer keeps the Python number it holds;
- a subclass (a plugin author's) that adds an option to ``built_options`` and sets it in its own
  ``__init__`` after the parent built the layer failed with a bare "object has no attribute": an option
  the layer does not hold yet is set; a change of it afterwards is refused as any other;
- ``InnerloopForCausalLM`` / ``InnerloopModel`` refused ``position_ids`` of a right-padded batch made by
  GPT-2's recipe (the pads at position 1), saying the row's examples were packed and to pad to the
  right, which it was: the positions of pads (mask 0) are read by nothing and are not compared
  (the test is in ``tests/hf/test_forward_arguments.py``, with the other positions);
- ``CausalLM.forward`` (``features`` then the head) compiled to two graphs where it was one: the eager
  input checks inside ``features`` split the graph at its call, the LM head alone in the second.
"""

from __future__ import annotations

import numpy as np
import pytest

from innerloop.core.layer import TTTLayer
from innerloop.models.attention import CausalSelfAttention


@pytest.mark.parametrize("layer_class", [TTTLayer, CausalSelfAttention])
def test_a_built_option_set_to_an_equal_number_the_constructor_takes_is_taken(layer_class) -> None:
    layer = layer_class(16, 2)
    layer.rope_theta = 10000  # an int, where the layer holds the float 10000.0
    layer.rope_theta = np.float64(10000.0)
    layer.num_heads = np.int64(2)
    assert type(layer.rope_theta) is float and type(layer.num_heads) is int  # what it held, kept
    with pytest.raises(AttributeError, match=rf"{layer_class.__name__}\.rope_theta is fixed"):
        layer.rope_theta = np.float64(500.0)  # another value still refused


def test_a_subclass_may_add_a_built_option_and_set_it_after_its_parent_is_built() -> None:
    class Widened(TTTLayer):
        built_options = (*TTTLayer.built_options, "extra_width")

        def __init__(self, *args, extra_width: int = 3, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.extra_width = extra_width

    layer = Widened(16, 2)
    layer.extra_width = 3
    with pytest.raises(AttributeError, match=r"Widened\.extra_width is fixed when the layer is built"):
        layer.extra_width = 4


@pytest.mark.slow  # torch.compile traces a one-block model: ~3 s on a loaded 2-core machine (dynamo import included)
def test_a_compiled_language_model_is_one_graph_after_its_eager_checks() -> None:
    """``CausalLM.forward`` became ``features`` then the head, with the eager input checks inside
    ``features``: torch.compile split the graph at that call, the head's matmul a graph of its own (two
    graphs where there was one; a decode step paid the extra graph's guards and call; a TTT model, whose
    blocks break graphs, got the head alone too). Checked in ``forward`` before the blocks, which run in
    one function with the head, the model compiles to one graph again, equal to eager."""
    import torch
    from torch._dynamo.testing import CompileCounter

    from innerloop.models.config import ModelConfig
    from innerloop.models.lm import CausalLM

    config = ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=1, mixer="attention")
    model = CausalLM(config).eval()
    counter = CompileCounter()
    torch._dynamo.reset()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(torch.compile(model, backend=counter)(ids)[0], model(ids)[0])
    torch._dynamo.reset()
    assert counter.frame_count == 1
