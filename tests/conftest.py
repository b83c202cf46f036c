import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; the variable must be set
# before any kernel is defined (triton.jit reads it at decoration).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import timm

import visionzoo  # noqa: F401  (registers the models, after TRITON_INTERPRET)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run many small ops: one thread is faster, and far faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def load_official(tmp_path):
    """``load_official(name, state_dict, **kwargs)``: ``timm.create_model(name, pretrained=True, **kwargs)`` from
    ``state_dict`` saved as a release file, so the weights go through the family's ``checkpoint_filter_fn``."""

    def load(name: str, state_dict: dict, **kwargs) -> torch.nn.Module:
        path = tmp_path / f"{name}.pth"
        torch.save(state_dict, path)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)

    return load


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
