"""Our checkpoint format, format detection and errors, configs and presets."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpmlive.model.ant.config import AntConfig
from cpmlive.model.registry import preset
from cpmlive.errors import CpmliveError
from cpmlive.model import checkpoint
from cpmlive.model.ant.model import CpmAnt, build_model
from cpmlive.model.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    expected_shapes,
    load_model,
    read_safetensors,
    save_checkpoint,
    write_weights,
)
from cpmlive.model.ant.keys import config_from_openbmb_state
from cpmlive.model.ant.convert import checkpoint_info, convert, detect_format, load_any

from conftest import REFERENCE

TINY = REFERENCE / "ant-tiny"
MASK = [[False, False], [False, True], [True, False]]
CONFIG = AntConfig(vocab_size=500, dim_model=32, dim_ff=64, num_layers=3, num_heads=2, dim_head=8, half=False,
                   prompt_types=4, segment_types=4, mask_modules=MASK)


def assert_same_weights(model: torch.nn.Module, other: torch.nn.Module) -> None:
    mine, theirs = model.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key


@pytest.fixture
def saved(tmp_path: Path) -> tuple[CpmAnt, Path]:
    model = build_model(CONFIG, seed=1)
    return model, save_checkpoint(model, CONFIG, tmp_path / "ckpt", vocab=["<pad>", "<unk>", "a"])


# ---- round trips ---------------------------------------------------------------------------


def test_save_load_round_trip(saved: tuple[CpmAnt, Path]) -> None:
    model, path = saved
    loaded = load_model(path)
    assert loaded.config == CONFIG and loaded.config.mask_modules == MASK
    assert_same_weights(model, loaded)
    assert (path / "vocab.txt").read_text("utf-8") == "<pad>\n<unk>\na\n"
    assert detect_format(path) == "ours"


def test_sharded_checkpoint(tmp_path: Path) -> None:
    model = build_model(CONFIG, seed=2)
    path = save_checkpoint(model, CONFIG, tmp_path / "sharded", shard_bytes=20_000)
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (path / WEIGHTS_NAME).exists()
    index = json.loads((path / INDEX_NAME).read_text("utf-8"))
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert_same_weights(model, load_model(path))
    state, config = load_any(path)
    assert config == CONFIG and set(state) == set(model.state_dict())


def test_written_files_are_readable_like_plain_files(saved: tuple[CpmAnt, Path], tmp_path: Path) -> None:
    """Temp files and safetensors' writer make private 0600 files; shared checkpoints must not be."""
    _, path = saved
    umask = os.umask(0o022)
    try:
        written = [save_checkpoint(build_model(CONFIG, seed=3), CONFIG, tmp_path / "sharded", shard_bytes=20_000),
                   convert(path, tmp_path / "ours", dtype="float16"), convert(path, tmp_path / "hf", to="hf"),
                   convert(path, tmp_path / "pt" / "model.pt", to="openbmb"),
                   convert(path, tmp_path / "st" / "model.safetensors", to="openbmb")]
    finally:
        os.umask(umask)
    files = [f for p in written for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    assert len(files) > 10
    assert {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {str(f): "0o644" for f in files}


def test_failed_save_leaves_old_checkpoint_intact(saved: tuple[CpmAnt, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model, path = saved

    def broken_write(state: dict, directory: Path, shard_bytes: int = 0) -> None:
        (directory / WEIGHTS_NAME).write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_weights", broken_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_model(CONFIG, seed=9), CONFIG, path)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, CONFIG, path.parent / "fresh")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert_same_weights(model, load_model(path))


# ---- memory mapping ----------------------------------------------------------------------------


def mapped_ranges(file: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(file.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_loaded_parameters_live_in_the_file_mapping(saved: tuple[CpmAnt, Path]) -> None:
    _, path = saved
    model = load_model(path)
    ranges = mapped_ranges(path / WEIGHTS_NAME)
    assert ranges
    for name, param in model.named_parameters():
        pointer = param.untyped_storage().data_ptr()
        assert any(start <= pointer < end for start, end in ranges), name


# ru_maxrss survives fork+exec (the child would start with pytest's peak), so the peak is
# VmHWM, reset through /proc/self/clear_refs once the imports are done.
PEAK_SCRIPT = """
import re, sys, psutil
from cpmlive.model.checkpoint import load_model

def peak_rss():
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024

load_model(sys.argv[2])
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
baseline = psutil.Process().memory_info().rss
model = load_model(sys.argv[1])
checksum = sum(float(p.detach().sum()) for p in model.parameters())
print(peak_rss() - baseline, checksum)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_while_loading_stays_near_file_size(saved: tuple[CpmAnt, Path], tmp_path: Path) -> None:
    pytest.importorskip("psutil")
    config = AntConfig(vocab_size=30720, dim_model=512, dim_ff=4096, num_layers=4, num_heads=8, dim_head=64,
                       half=False)
    state = {name: torch.full(shape, 0.5) for name, shape in expected_shapes(config).items()}
    path = save_checkpoint(state, config, tmp_path / "big")
    del state
    size = (path / WEIGHTS_NAME).stat().st_size
    assert size > 150 * 1024**2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(saved[1])], env=env,
                            capture_output=True, text=True, check=True, timeout=120)
    growth, checksum = result.stdout.split()
    assert float(checksum) > 0
    assert int(growth) <= 1.2 * size, f"peak RSS grew {int(growth) / size:.2f}x the file size"


# ---- errors -------------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CpmliveError, match="no such checkpoint"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CpmliveError, match="no such file or directory"):
        load_any(tmp_path / "nowhere")


def test_missing_weights_file(saved: tuple[CpmAnt, Path]) -> None:
    _, path = saved
    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(CpmliveError, match=f"no {WEIGHTS_NAME}"):
        load_model(path)
    with pytest.raises(CpmliveError, match=f"no {WEIGHTS_NAME}"):
        load_any(path)


def test_truncated_weights_file(saved: tuple[CpmAnt, Path]) -> None:
    _, path = saved
    weights = path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CpmliveError, match="truncated"):
        load_model(path)
    weights.write_bytes(data[:5])
    with pytest.raises(CpmliveError, match="too short"):
        load_model(path)


@pytest.mark.parametrize("header", [b"{not json", b"[1, 2, 3]", b'{"w": {"dtype": "F32", "shape": [-1], '
                                    b'"data_offsets": [0, 4]}}'])
def test_corrupt_header(saved: tuple[CpmAnt, Path], header: bytes) -> None:
    _, path = saved
    (path / WEIGHTS_NAME).write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(CpmliveError, match="corrupt safetensors"):
        load_model(path)


def test_header_longer_than_file(saved: tuple[CpmAnt, Path]) -> None:
    _, path = saved
    (path / WEIGHTS_NAME).write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CpmliveError, match="corrupt safetensors header"):
        load_model(path)


def test_config_weight_shape_mismatch(saved: tuple[CpmAnt, Path]) -> None:
    _, path = saved
    data = json.loads((path / "config.json").read_text("utf-8"))
    (path / "config.json").write_text(json.dumps({**data, "dim_ff": 48}), "utf-8")
    for load in (load_model, load_any):
        with pytest.raises(CpmliveError) as error:
            load(path)
        message = str(error.value)
        assert "layers.0.ffn.w_0.weight" in message and "[64, 32]" in message and "[48, 32]" in message


def test_unknown_key(saved: tuple[CpmAnt, Path]) -> None:
    model, path = saved
    write_weights({**model.state_dict(), "extra.weight": torch.zeros(2)}, path)
    with pytest.raises(CpmliveError, match="'extra.weight'"):
        load_model(path)
    with pytest.raises(CpmliveError, match="unknown key 'extra.weight'"):
        load_any(path)


def test_conversion_errors(saved: tuple[CpmAnt, Path], tmp_path: Path) -> None:
    _, path = saved
    text = tmp_path / "notes.txt"
    text.write_text("hello", "utf-8")
    with pytest.raises(CpmliveError, match="unknown checkpoint format"):
        load_any(text)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"garbage that is not a torch file")
    with pytest.raises(CpmliveError, match="broken.pt: unreadable or corrupt"):
        load_any(broken)
    with pytest.raises(CpmliveError, match="unknown target format"):
        convert(path, tmp_path / "out", to="onnx")
    with pytest.raises(CpmliveError, match="vocabulary file not found"):
        convert(path, tmp_path / "out", vocab_path=tmp_path / "missing.txt")


def test_openbmb_shape_mismatch_names_the_openbmb_key(tmp_path: Path) -> None:
    config = json.loads((TINY / "config.json").read_text("utf-8"))
    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps({**config, "dim_ff": 96}), "utf-8")
    with pytest.raises(CpmliveError) as error:
        load_any(TINY / "model.safetensors", config_path=bad_config)
    message = str(error.value)
    assert "model.safetensors" in message and "encoder.layers.0.ffn.ffn.w_in.w_0.weight" in message
    assert "[160, 32]" in message and "[96, 32]" in message


# ---- formats, info and OpenBMB configs ----------------------------------------------------------


def test_detect_format_and_info(saved: tuple[CpmAnt, Path], tmp_path: Path) -> None:
    model, path = saved
    assert detect_format(TINY) == "openbmb" and detect_format(TINY / "model.safetensors") == "openbmb"
    info = checkpoint_info(path)
    files = [p for p in path.iterdir()]
    assert info["format"] == "ours" and info["config"] == CONFIG.to_dict()
    assert info["parameters"] == model.num_parameters() and info["dtypes"] == ["float32"]
    assert info["files"] == 3 and info["size_bytes"] == sum(p.stat().st_size for p in files)
    reference = checkpoint_info(TINY)
    assert reference["format"] == "openbmb" and reference["config"] == AntConfig.load(TINY / "config.json").to_dict()
    hf = convert(path, tmp_path / "hf", to="hf")
    assert detect_format(hf) == "hf" and checkpoint_info(hf)["format"] == "hf"
    assert (hf / "vocab.txt").read_text("utf-8") == (path / "vocab.txt").read_text("utf-8")


def test_config_from_openbmb_state_recovers_fixture_config() -> None:
    inferred = config_from_openbmb_state(read_safetensors(TINY / "model.safetensors"))
    assert inferred == AntConfig.load(TINY / "config.json")
    assert inferred.mask_modules == MASK


def test_openbmb_pt_without_config_infers_it(tmp_path: Path) -> None:
    state = read_safetensors(TINY / "model.safetensors")
    torch.save(dict(state), tmp_path / "cpm-ant.pt")
    loaded, config = load_any(tmp_path / "cpm-ant.pt")
    assert config == AntConfig.load(TINY / "config.json")
    reference, _ = load_any(TINY / "model.safetensors")
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


# ---- configs and presets -------------------------------------------------------------------------


def parameter_formula(config: AntConfig) -> int:
    d, inner, ff = config.dim_model, config.dim_attention, config.dim_ff
    tables = (config.vocab_size + config.prompt_types * config.prompt_length + config.segment_types) * d
    bias = (config.segment_types**2 + config.position_bias_num_buckets) * config.num_heads
    attention = sum(config.has_attention(i) for i in range(config.num_layers)) * (d + 4 * d * inner)
    ffn = sum(config.has_ffn(i) for i in range(config.num_layers)) * (d + 3 * d * ff)
    return tables + bias + attention + ffn + d


def meta_parameters(config: AntConfig) -> int:
    with torch.device("meta"):
        return CpmAnt(config).num_parameters()


def test_ant_10b_parameter_count() -> None:
    config = preset("ant-10b")
    count = meta_parameters(config)
    assert count == parameter_formula(config) == 9_391_624_192
    assert 9e9 < count < 1.1e10


@pytest.mark.parametrize("name, attention, ffn, heads, dim_ff", [
    ("ant-7b", 37, 32, 32, 10240), ("ant-3b", 37, 32, 20, 3735),
    ("ant-1b", 25, 21, 16, 700), ("ant-300m", 25, 21, 4, 350),
])
def test_compressed_presets(name: str, attention: int, ffn: int, heads: int, dim_ff: int) -> None:
    config = preset(name)
    assert config.num_layers == 48 and config.dim_model == 4096 and config.dim_head == 128
    assert sum(config.has_attention(i) for i in range(48)) == attention
    assert sum(config.has_ffn(i) for i in range(48)) == ffn
    assert (config.num_heads, config.dim_ff) == (heads, dim_ff)
    assert meta_parameters(config) == parameter_formula(config)


def test_config_json_round_trip(tmp_path: Path) -> None:
    CONFIG.save(tmp_path / "config.json")
    assert AntConfig.load(tmp_path / "config.json") == CONFIG
    assert AntConfig.from_dict(json.loads(CONFIG.to_json())) == CONFIG


def test_config_json_keeps_openbmb_key_order() -> None:
    """The shared fields live in StackConfig, the family's own in its config: config.json (and
    ``cpmlive info``) still list them as OpenBMB's cpm-ant-10b.json and cpm-bee-10b.json do."""
    from cpmlive.model.bee.config import BeeConfig
    from cpmlive.model.cpm1.config import Cpm1Config

    shape = ["vocab_size", "dim_model", "dim_ff", "num_layers", "num_heads", "dim_head", "dropout_p"]
    tail = ["mask_modules", "max_length", "model_type"]
    assert list(AntConfig(moe={"experts": 16}).to_dict()) == [
        *shape, "position_bias_num_buckets", "position_bias_max_distance", "eps", "half", "prompt_types",
        "prompt_length", "segment_types", *tail, "moe"]
    assert list(BeeConfig(quantization={"bits": 8}).to_dict()) == [
        *shape, "position_bias_num_buckets", "position_bias_num_segment_buckets", "position_bias_max_distance",
        "eps", "half", *tail, "quantization"]
    assert list(Cpm1Config().to_dict()) == [*shape, "eps", "half", *tail]


@pytest.mark.parametrize("half", [False, True])
def test_hf_config_round_trip(half: bool) -> None:
    transformers = pytest.importorskip("transformers")
    config = AntConfig(vocab_size=700, dim_model=48, dim_ff=80, num_layers=2, num_heads=2, dim_head=32,
                       position_bias_num_buckets=64, position_bias_max_distance=256, half=half)
    assert AntConfig.from_hf(config.to_hf()) == config
    hf = transformers.CpmAntConfig(**config.to_hf())
    assert (hf.hidden_size, hf.num_attention_heads, hf.num_hidden_layers) == (48, 2, 2)
    assert AntConfig.from_hf(hf.to_dict()) == config
