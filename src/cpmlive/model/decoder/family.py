"""The decoder family's entry in the registry."""

from cpmlive.model.decoder import convert
from cpmlive.model.decoder.config import ARCHITECTURES, PRESETS, DecoderConfig
from cpmlive.model.decoder.model import Decoder, build_decoder
from cpmlive.model.registry import Family
from cpmlive.resources import DECODER_DEMO
from cpmlive.tokenizer.hf import HFTokenizer

FAMILY = Family(
    model_type="decoder", name="Llama-family",
    abilities=frozenset({"generate", "chat", "title", "classify", "align", "calibrate", "prune", "retrain"}),
    hint="a Llama-family model is a left-to-right model: use generate or chat", config=DecoderConfig,
    model=Decoder, tokenizer=HFTokenizer, presets=PRESETS, build=build_decoder, load=convert.load_pretrained,
    convert=convert.convert, info=convert.checkpoint_info, resolve=convert.resolve, aliases=ARCHITECTURES,
    vocab_name=HFTokenizer.vocab_file, vocab_example="tokenizer.json", demo=DECODER_DEMO,
    claims=convert.is_decoder_checkpoint,
    signature_keys=("model.embed_tokens.weight", "attn.project_kv_a.weight"),
    weights_name="Llama-family (HF decoder)",
    pretrain_objective="causal",
    adapter_modules=convert.adapter_modules,
)
