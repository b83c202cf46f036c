import pytest
import torch

import visionzoo

MODELS = visionzoo.list_models()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
