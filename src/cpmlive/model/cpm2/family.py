"""The CPM-2 family's entry in the registry."""

from cpmlive.model.cpm2 import convert
from cpmlive.model.cpm2.config import PRESETS, Cpm2Config
from cpmlive.model.cpm2.model import Cpm2, build_cpm2
from cpmlive.model.registry import Family
from cpmlive.resources import CPM2_DEMO
from cpmlive.tokenizer.cpm2 import Cpm2Tokenizer

FAMILY = Family(
    model_type="cpm2", name="CPM-2", abilities=frozenset({"generate", "fill", "chat", "embed"}),
    hint="CPM-2 writes the span after its input: use generate", config=Cpm2Config, model=Cpm2,
    tokenizer=Cpm2Tokenizer, presets=PRESETS, build=build_cpm2, load=convert.load_pretrained,
    convert=convert.convert, info=convert.checkpoint_info, resolve=convert.resolve, aliases=("eva",),
    vocab_name=Cpm2Tokenizer.vocab_file, vocab_example="CPM-2's vocab.txt", demo=CPM2_DEMO,
    claims=convert.is_cpm2_checkpoint,
    signature_keys=("word_embeds.weight", "position_bias_enc.relative_attention_bias"),
    weights_name="CPM-2 (the original's or ModelCenter's)",
)
