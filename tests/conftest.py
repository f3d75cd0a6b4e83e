from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
REFERENCE = FIXTURES / "reference"
ANT_VOCAB = FIXTURES / "cpm-ant-vocab.txt"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """What the code caches (a GGUF's tokenizer written out) goes to the session's own folder,
    never the user's ``~/.cache``."""
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.is_dir(), f"shared fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def ant_vocab_path() -> Path:
    assert ANT_VOCAB.is_file()
    return ANT_VOCAB
