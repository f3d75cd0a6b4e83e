"""The T5 family's entry in the registry."""

from cpmlive.model.registry import Family
from cpmlive.model.t5 import convert
from cpmlive.model.t5.config import ARCHITECTURES, PRESETS, T5Config
from cpmlive.model.t5.model import T5, build_t5
from cpmlive.resources import T5_DEMO
from cpmlive.tokenizer.hf import HFTokenizer

FAMILY = Family(
    model_type="t5", name="T5", abilities=frozenset({"generate", "fill", "embed"}),
    hint="T5 reads an input and writes its output: use generate", config=T5Config, model=T5,
    tokenizer=HFTokenizer, presets=PRESETS, build=build_t5, load=convert.load_pretrained, convert=convert.convert,
    info=convert.checkpoint_info, resolve=convert.resolve, aliases=tuple(a for a in ARCHITECTURES if a != "t5"),
    vocab_name=HFTokenizer.vocab_file, vocab_example="tokenizer.json", demo=T5_DEMO,
    claims=convert.is_t5_checkpoint,
    signature_keys=("shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"),
    weights_name="T5 (HF encoder-decoder)",
)
