"""The BERT family's entry in the registry."""

from cpmlive.model.bert import convert
from cpmlive.model.bert.config import ARCHITECTURES, PRESETS, BertConfig
from cpmlive.model.bert.model import Bert, build_bert
from cpmlive.model.registry import Family
from cpmlive.resources import BERT_DEMO
from cpmlive.tokenizer.hf import HFTokenizer

FAMILY = Family(
    model_type="bert", name="BERT", abilities=frozenset({"embed", "fill", "classify"}),
    hint="BERT is an encoder: use embed (/v1/embeddings), fill one token per [MASK], or classify with its head",
    config=BertConfig, model=Bert, tokenizer=HFTokenizer, presets=PRESETS, build=build_bert,
    load=convert.load_pretrained, convert=convert.convert, info=convert.checkpoint_info, resolve=convert.resolve,
    aliases=tuple(a for a in ARCHITECTURES if a != "bert"), vocab_name=HFTokenizer.vocab_file,
    vocab_example="tokenizer.json", demo=BERT_DEMO, claims=convert.is_bert_checkpoint,
    signature_keys=("bert.embeddings.word_embeddings.weight", "roberta.embeddings.word_embeddings.weight",
                    "embeddings.word_embeddings.weight"),
    weights_name="BERT (HF encoder)",
)
