"""``model.kernels.project``: every epilogue against the plain PyTorch expression."""

import pytest
import torch
import torch.nn.functional as F

from cpmlive.model.runtime.kernels import project

IN, OUT = 24, 40


@pytest.mark.parametrize("rows", [1, 4, 64])  # oneDNN (few rows) and F.linear (many)
@pytest.mark.parametrize("grad", [False, True])
def test_epilogues_match_the_plain_expressions(rows, grad):
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(IN, OUT, bias=False)
    x, other = torch.randn(2, rows, IN, generator=g), torch.randn(2, rows, OUT, generator=g)
    plain = x @ linear.weight.T
    expected = {"none": plain, "gelu": F.gelu(plain), "gate": other * plain, "residual": other + plain}
    with torch.set_grad_enabled(grad):
        for epilogue, want in expected.items():
            got = project(x, linear, epilogue, other if epilogue in ("gate", "residual") else None)
            assert (got - want).abs().max() < 1e-5, epilogue
        assert (project(x, linear.weight) - plain).abs().max() < 1e-5  # a bare weight


def test_an_epilogue_gets_exactly_the_tensor_it_needs():
    linear, x = torch.nn.Linear(IN, OUT, bias=False), torch.randn(3, IN)
    with pytest.raises(ValueError, match="needs"):
        project(x, linear, "residual")
    with pytest.raises(ValueError, match="takes no"):
        project(x, linear, "gelu", torch.randn(3, OUT))
    with pytest.raises(ValueError, match="unknown"):
        project(x, linear, "relu")
