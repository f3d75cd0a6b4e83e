"""The accelerator memory budget (``runtime.offload``), run on the CPU as its own device: the
same outputs as the whole model, at most two streamed blocks on the device at once."""

import pytest
import torch

from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import model_class
from cpmlive.model.registry import preset
from cpmlive.model.runtime.offload import offload_to_device


def block_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.layers[0].parameters(), *model.layers[0].buffers()))


@pytest.mark.parametrize("name", ["ant-tiny", "decoder-tiny"])
def test_offloaded_model_computes_the_same_within_its_limit(name):
    config = preset(name)
    config = type(config).from_dict({**config.to_dict(), "num_layers": 6})
    torch.manual_seed(0)
    model = model_class(config)(config).eval()
    ids = torch.randint(1, 200, (2, 12))
    zeros = torch.zeros(2, 12, dtype=torch.int32)
    ones = torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        want = model(ids, zeros, ones, zeros, ones)
    everything = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    fixed = everything - len(model.layers) * block_bytes(model)
    limit = fixed + 3 * block_bytes(model)  # one resident block, two in flight
    stream = offload_to_device(model, limit, "cpu")
    assert len(stream.resident) == 1 and len(stream.streamed) == 5
    with torch.no_grad():
        for _ in range(2):  # the second pass reuses the wrap-around prefetch
            got = model(ids, zeros, ones, zeros, ones)
            assert torch.equal(got, want)
    assert stream.peak_bytes <= limit
    assert stream.device_bytes <= fixed + 3 * block_bytes(model)
    assert "1 of 6 blocks resident" in stream.describe()


def test_a_limit_below_two_blocks_is_refused():
    config = preset("ant-tiny")
    model = model_class(config)(config)
    with pytest.raises(CpmliveError, match="plus two of its largest blocks"):
        offload_to_device(model, 1000, "cpu")
