"""What every registered model family must pass (``docs/adding-a-family.md``): the tests run
over ``registry.families()``, so a new family gets them with its registry line."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

from cpmlive.errors import CpmliveError
from cpmlive.model import registry
from cpmlive.model.checkpoint import CONFIG_NAME, save_checkpoint
from cpmlive.model.formats import FILE_FORMATS
from cpmlive.resources import model_path

FAMILIES = list(registry.families().values())
TEXT = "北京是中国的首都。今天天气不错"  # (CPM-1's SentencePiece reads full-width commas as ASCII ones)


def each_family(test):
    return pytest.mark.parametrize("kind", FAMILIES, ids=[kind.model_type for kind in FAMILIES])(test)


def meta_parameters(kind: registry.Family, name: str) -> int:
    with torch.device("meta"):
        return kind.model(kind.presets[name]()).num_parameters()


def smallest_preset(kind: registry.Family) -> str:
    return min(kind.presets, key=lambda name: meta_parameters(kind, name))


def formats(kind: registry.Family) -> tuple[str, ...]:
    """The layouts its ``convert`` writes: ``FORMATS`` of the ``convert.py`` in its folder."""
    folder = kind.model.__module__.rpartition(".")[0]
    return importlib.import_module(f"{folder}.convert").FORMATS


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Each family's smallest preset with fresh weights over its shipped vocabulary, saved in our
    layout with that vocabulary (a GGUF file, for one, carries it)."""
    out = {}
    for kind in FAMILIES:
        demo = model_path(kind.demo)
        vocab_size = kind.config.load(demo / CONFIG_NAME).vocab_size
        config = dataclasses.replace(kind.presets[smallest_preset(kind)](), vocab_size=vocab_size)
        model = kind.build(config, device="cpu", dtype=torch.float32, seed=0)
        out[kind.model_type] = model, save_checkpoint(model, config, tmp_path_factory.mktemp(kind.model_type),
                                                      vocab=demo / kind.vocab_name)
    return out


@each_family
def test_the_entry_declares_what_the_registry_asks(kind):
    assert kind.abilities <= set(registry.ABILITIES), "abilities are keys of registry.ABILITIES"
    assert registry.family(kind.model_type) is kind and all(registry.family(alias) is kind for alias in kind.aliases)
    assert kind.presets and all(registry.preset_family(name) is kind for name in kind.presets)
    for method in ("for_model", "from_file", "decode"):
        assert callable(getattr(kind.tokenizer, method, None)), f"{kind.tokenizer.__name__} has no {method}"
    assert "ours" in formats(kind)


@each_family
def test_every_preset_builds_on_the_meta_device(kind):
    for name in kind.presets:
        config = kind.presets[name]()
        assert isinstance(config, kind.config) and config.model_type == kind.model_type
        assert meta_parameters(kind, name) > 0


@each_family
def test_a_checkpoint_round_trips_through_convert_in_every_format(kind, saved, tmp_path):
    model, source = saved[kind.model_type]
    assert registry.family_of(source) is kind
    expected = model.state_dict()
    for layout in formats(kind):
        single = FILE_FORMATS.get(layout)  # OpenBMB's and GGUF are one file
        target = tmp_path / layout / (f"model{single[0]}" if single else "")
        written = kind.convert(source, target, to=layout)
        assert registry.family_of(written) is kind, layout
        loaded, _ = kind.load(written, dtype=torch.float32)
        state = loaded.state_dict()
        assert state.keys() == expected.keys(), layout
        for name, tensor in expected.items():
            torch.testing.assert_close(state[name], tensor, msg=f"{layout}: {name}")


@each_family
def test_info_describes_a_checkpoint(kind, saved):
    model, source = saved[kind.model_type]
    info = kind.info(source)
    assert info["parameters"] == model.num_parameters() and info["format"] and info["config"]
    assert kind.resolve(source) is not None


@each_family
def test_what_a_family_cannot_do_is_refused_in_one_line(kind):
    for ability in registry.ABILITIES:
        if kind.can(ability):
            kind.require(ability)
            continue
        with pytest.raises(CpmliveError) as refused:
            kind.require(ability)
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"{kind.name} cannot ")
        assert registry.owners(ability) in message


@each_family
def test_its_tokenizer_round_trips_text_of_its_shipped_vocabulary(kind):
    assert kind.demo, f"{kind.name} ships no checkpoint (Family.demo): its tokenizer has no vocabulary to be tested on"
    directory = model_path(kind.demo)
    vocab_size = kind.config.load(directory / CONFIG_NAME).vocab_size
    tokenizer = kind.tokenizer.for_model(directory / kind.vocab_name, vocab_size)
    assert tokenizer.vocab_size == vocab_size
    encoded = tokenizer.encode(TEXT)
    ids, rest = (encoded[0], encoded[1:]) if isinstance(encoded, tuple) else (encoded, ())  # CPM-Bee: (ids, ext)
    assert ids and all(0 <= i < vocab_size or rest for i in ids)
    assert tokenizer.decode(ids, *rest) == TEXT
    with pytest.raises(CpmliveError) as refused:  # more tokens than embedding rows (some HF models pad the rows)
        kind.tokenizer.for_model(directory / kind.vocab_name, vocab_size - 1)
    assert "\n" not in str(refused.value)
