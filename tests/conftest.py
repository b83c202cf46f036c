import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; the variable must be set
# before any kernel is defined (triton.jit reads it at decoration).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import visionzoo

MODELS = visionzoo.list_models()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run many small ops: one thread is faster, and far faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_SIZES = ("mini", "micro", "tiny", "small", "base", "large")


def _family_and_rank(name: str) -> tuple[str, int]:
    """``nat_mini``: ("nat", 0); ``mixvit_tiny_halo``: ("mixvit_halo", 2); ``ela_resnet50``: ("ela_resnet", 50)."""
    parts, rank = [], 0
    for part in name.split("_"):
        if part in _SIZES:
            rank = _SIZES.index(part)
        elif part[-1].isdigit():
            stem = part.rstrip("0123456789")
            parts.append(stem)
            rank = int(part[len(stem) :])
        else:
            parts.append(part)
    return "_".join(parts), rank


def _smallest_of_each_family(names: list[str]) -> list[str]:
    smallest: dict[str, tuple[int, str]] = {}
    for name in names:
        family, rank = _family_and_rank(name)
        smallest[family] = min(smallest.get(family, (rank, name)), (rank, name))
    return sorted(name for _, name in smallest.values())


# Sizes of a family share their code: the thorough per-model tests run on the smallest one.
FAMILY_MODELS = _smallest_of_each_family(MODELS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
