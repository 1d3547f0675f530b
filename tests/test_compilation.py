"""A compilation that a method's argument asked for fails with an error naming that argument."""

from __future__ import annotations

import pytest
import torch
import torch._functorch.config
import torch._inductor.config
from torch import nn

from lightning_bayes.inference.linalg import ParameterFunction
from lightning_bayes.inference.vbll import DiscriminativeVBLL
from lightning_bayes.modules.vbll import compiled_head_loss


@pytest.fixture()
def no_cxx_compiler(fresh_dynamo):
    """Inductor without a working C++ compiler and without its caches (a cached graph would need none)."""
    with (
        torch._inductor.config.patch({"cpp.cxx": ("no-such-cxx",), "fx_graph_cache": False}),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield


def test_a_failed_compilation_names_the_argument_that_asked_for_it(no_cxx_compiler) -> None:
    torch.manual_seed(0)
    function = ParameterFunction(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), compile_jacobian=True)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    with pytest.raises(RuntimeError, match=r"compile_jacobian=True runs under torch.compile") as raised:
        function.jacobian(x, y)
    assert "No working C++ compiler" in str(raised.value) and "set compile_jacobian=False" in str(raised.value)


def test_a_failed_compilation_of_the_vbll_loss_names_compile_loss(no_cxx_compiler) -> None:
    head = DiscriminativeVBLL(4, 3, regularization_weight=0.1)
    with pytest.raises(RuntimeError, match=r"compile_loss=True runs under torch.compile.*set compile_loss=False"):
        compiled_head_loss(head, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
