"""``--memory-limit`` (``model/runtime/streaming.py``): streamed blocks give the ids of the whole model,
and the weights' resident memory (``/proc/self/smaps``) stays within the budget."""

import dataclasses
from pathlib import Path

import pytest
import torch

import cpmlive.model.runtime.native as native
from cpmlive.cli import main
from cpmlive.compress.quantize import quantize_model
from cpmlive.model.ant.config import AntConfig
from cpmlive.config import QuantConfig
from cpmlive.errors import CpmliveError
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import load_model, save_checkpoint
from cpmlive.model.runtime.streaming import parse_size, resident_bytes, spread_order, stream_weights

CONFIG = AntConfig(vocab_size=512, dim_model=256, dim_ff=1024, num_layers=6, num_heads=4, dim_head=64,
                   prompt_length=4, max_length=128, half=False)
ROWS = [[6, 40, 41, 42, 43, 44, 45, 46], [6, 50, 51]]
OPTIONS = GenerationConfig(max_new_tokens=10, min_new_tokens=10)
BLOCK_BYTES = 4 * (4 * 256 * 256 + 3 * 256 * 1024)


def checkpoint(tmp_path: Path, config: AntConfig = CONFIG, quantization: QuantConfig | None = None) -> Path:
    model = build_model(config, seed=0)
    with torch.no_grad():
        model.position_bias.weight.normal_(generator=torch.Generator().manual_seed(1))
        model.input_embedding.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(2))
    if quantization is not None:
        model = quantize_model(model, quantization)
        config = model.config
    return save_checkpoint(model, config, tmp_path / "ckpt")


def files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def reference(path: Path) -> list[list[int]]:
    with torch.no_grad():
        return generate_ids(load_model(path), ROWS, OPTIONS, stop_ids=7)


@pytest.mark.parametrize("blocks", ["native", "pytorch"])
def test_streamed_model_decodes_the_same_ids_within_the_budget(tmp_path, blocks):
    path = checkpoint(tmp_path)
    want = reference(path)
    limit = 3 * BLOCK_BYTES + (1 << 20)  # embeddings + two streaming + one resident block: ~half the model
    model = load_model(path)
    stream = stream_weights(model, limit)
    assert len(stream.streamed) >= 3 and stream.total > 1.8 * limit
    if blocks == "pytorch":
        with native.switched_off(), torch.no_grad():
            got = generate_ids(model, ROWS, OPTIONS, stop_ids=7)
    else:
        with torch.no_grad():
            got = generate_ids(model, ROWS, OPTIONS, stop_ids=7)
    assert got == want
    assert resident_bytes(files(path)) <= limit
    stream.close()


def test_uneven_pruned_and_int8_models_stream(tmp_path):
    pruned = dataclasses.replace(CONFIG, mask_modules=[[False, False], [True, False], [False, True], [False, False],
                                                       [True, False], [False, False]])
    for index, (config, quantization) in enumerate([(pruned, None), (CONFIG, QuantConfig(bits=8))]):
        path = checkpoint(tmp_path / str(index), config, quantization)
        want = reference(path)
        model = load_model(path)
        sizes = {nbytes(block) for block in model.layers}
        limit = int(0.6 * nbytes(model))
        stream = stream_weights(model, limit)
        with torch.no_grad():
            assert generate_ids(model, ROWS, OPTIONS, stop_ids=7) == want
        assert resident_bytes(files(path)) <= limit and stream.streamed
        if index == 0:
            assert len(sizes) > 1  # the blocks really are uneven
        stream.close()


def test_a_limit_below_two_blocks_is_refused(tmp_path):
    model = load_model(checkpoint(tmp_path))
    with pytest.raises(CpmliveError, match="smaller than the model's embeddings and norms .* give at least"):
        stream_weights(model, BLOCK_BYTES)


def test_weights_converted_on_load_cannot_stream(tmp_path):
    model = load_model(checkpoint(tmp_path), dtype=torch.bfloat16)
    with pytest.raises(CpmliveError, match="copied into memory when loaded"):
        stream_weights(model, 10**9)


def test_cli_memory_limit_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "demo", "--memory-limit", "lots", "今天"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a size" in err[0]
    assert main(["generate", "demo", "--memory-limit", "1KB", "今天"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("smaller than" in err[0] or "copied into memory" in err[0])


def test_sizes_and_spread():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000
    assert parse_size("1.5g") == 1_500_000_000
    with pytest.raises(CpmliveError):
        parse_size("-3GB")
    order = spread_order(12)
    assert sorted(order) == list(range(12)) and order[:3] == [0, 8, 4]


def test_the_half_precision_demo_streams_its_stored_weights():
    """The demo is stored in float16: under a limit its matrices stay float16 views of the file
    (computed in float32, exactly), and it answers as the float32 load does."""
    import cpmlive

    plain = cpmlive.load("demo")
    limited = cpmlive.load("demo", memory_limit="26MB")
    stream = limited.model.weight_stream
    assert stream.streamed and limited.model.layers[0].attn.project_q.weight.dtype == torch.float16
    prompt = "今天天气不错，"
    assert limited.generate(prompt, max_new_tokens=16) == plain.generate(prompt, max_new_tokens=16)
    assert limited.fill("北京是中国的<mask>。") == plain.fill("北京是中国的<mask>。")
    assert resident_bytes(files(Path(limited.name))) <= 26_000_000
    stream.close()


def test_serve_with_a_limit_below_one_block_exits_2(capsys):
    assert main(["serve", "demo", "--memory-limit", "1KB", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "smaller than" in err[0]


def test_changing_a_streamed_weight_in_place_is_refused(tmp_path):
    model = load_model(checkpoint(tmp_path))
    stream = stream_weights(model, 3 * BLOCK_BYTES + (1 << 20))
    index = stream.order[0]
    with torch.no_grad():
        model.layers[index].ffn.w_0.weight.mul_(2)
        with pytest.raises(CpmliveError, match="changed in place"):
            generate_ids(model, ROWS, OPTIONS, stop_ids=7)
    stream.close()
