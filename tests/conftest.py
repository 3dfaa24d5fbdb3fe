import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def hf_model(arch: str, **overrides):
    """A randomly initialised Hugging Face model built from its default config (no download)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(arch, **overrides)
    cfg.use_cache = False
    for auto in (transformers.AutoModelForMaskedLM, transformers.AutoModelForCausalLM):
        if type(cfg) in auto._model_mapping:
            return auto.from_config(cfg).eval()
    raise ValueError(arch)
