"""Regression tests of the main session of review 53 (each seen failing before its fix)."""

import pytest
import torch

from innerloop.core.family_layers import LinearAttentionLayer


def test_weights_that_turn_nan_in_one_update_are_not_called_moderate_and_base_lr_is_named() -> None:
    """s53f: base_lr 3e38 with input of scale 10 turns every inner weight NaN at the first update (the
    step overflows). The message said "the inner weights stayed moderate (largest |W| 0.0e+00)" -- NaN
    left out of the magnitude -- and blamed the built-in plugins; it now says the weights turned NaN in
    one update and names base_lr first."""
    torch.manual_seed(0)
    layer = LinearAttentionLayer(64, 4, base_lr=3e38)
    with torch.no_grad(), pytest.raises(ValueError) as raised:
        layer(torch.randn(1, 32, 64) * 10)
    message = str(raised.value)
    assert "stayed moderate" not in message
    assert "the inner weights turned NaN or inf in one update from largest |W| 0.0e+00" in message
    assert "lower base_lr (now 3e+38)" in message
    assert message.index("lower base_lr") < message.index("its plugins are all built in")


def test_a_named_kernel_refusal_on_cuda_without_an_index_asks_about_the_current_gpu(monkeypatch) -> None:
    """s53c: first-use verdicts are kept per device with its index (cuda:0), but the checkpoint loader
    asked about torch.device("cuda"): a kernel that had failed its first-use check on the GPU was never
    found refused. The device is now the current GPU's."""
    from innerloop.core.layer import TTTLayer
    from innerloop.kernels import dispatch

    seen = []

    def select_kernel(rule, task, inputs):
        seen.append(inputs.device)

    monkeypatch.setattr(dispatch, "select_kernel", select_kernel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with GPUs, the current one 3
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    layer = TTTLayer(16, 2, mini_batch_size=4, kernel="cpu_ttt_linear")
    for device in (torch.device("cuda"), "cuda", torch.device("cuda", 1), torch.device("cpu")):
        dispatch.named_kernel_refusal(
            layer.update_rule,
            layer.inner_task(),
            device=device,
            dtype=torch.float32,
            head_dim=layer.head_dim,
            requires_grad=False,
        )
    assert seen == [
        torch.device("cuda", 3),
        torch.device("cuda", 3),
        torch.device("cuda", 1),
        torch.device("cpu"),
    ]
