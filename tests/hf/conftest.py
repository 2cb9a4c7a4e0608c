"""Shared setup of the Hugging Face tests: offline, quiet, and tiny models of every kind."""

from __future__ import annotations

import os
import tempfile

import pytest

# Nothing downloads: transformers, the Hub client and datasets are told so (subprocesses inherit it).
for _variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_variable] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
# trust_remote_code copies a folder's modules into HF_MODULES_CACHE: a temporary one, not ~/.cache.
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="innerloop-hf-modules-")

import transformers  # noqa: E402 (after the environment above)

transformers.utils.logging.disable_progress_bar()

from hf_testing import MODEL_KINDS  # noqa: E402


@pytest.fixture(params=sorted(MODEL_KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    """Each kind of model in turn."""
    return request.param
