"""Task evaluation on a JSONL file: character ROUGE for generation, accuracy and macro-F1 for
classification, and the perplexity of the references under the model for both."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from cpmlive.data.tasks import Example, check_labels
from cpmlive.infer.generate import GenerationConfig, beam_search, generate_ids
from cpmlive.api import LM
from cpmlive.apps.headline import TitleOptions, suggest_titles
from cpmlive.tune import metrics
from cpmlive.tune.task import TaskSpec, encode_input, encode_target, example_batch, target_logprobs


def reference_perplexity(lm: LM, spec: TaskSpec, examples: Sequence[Example], batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood per target token, ``</s>`` included)."""
    pairs = [(encode_input(lm.tokenizer, spec, e.input)[0], encode_target(lm.tokenizer, spec, e.target))
             for e in examples]
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            total += float(target_logprobs(lm.model, example_batch(chunk, spec.prompt_task, lm.model.config)).sum())
            count += sum(len(t) for _, t in chunk)
    return math.exp(-total / max(count, 1))


def generate_outputs(lm: LM, spec: TaskSpec, texts: Sequence[str], num_beams: int = 1, progress: bool = False,
                     titles: TitleOptions | None = None) -> list[str]:
    """One output per input: greedy/beam decoding, or the best of ``suggest_titles(titles)``."""
    outputs = []
    for text in _progress(texts, progress):
        if titles is not None:
            found = suggest_titles(lm, text, dataclasses.replace(titles, n=1))
            outputs.append(found[0] if found else "")
            continue
        row = encode_input(lm.tokenizer, spec, text)[0]
        config = GenerationConfig(max_new_tokens=spec.max_output_tokens, num_beams=num_beams)
        with torch.inference_mode():
            if num_beams > 1:
                ids = beam_search(lm.model, row, config, lm.tokenizer.eos_id, spec.prompt_task)[0][1]
            else:
                ids = generate_ids(lm.model, [row], config, lm.tokenizer.eos_id, spec.prompt_task)[0]
        outputs.append(lm.tokenizer.decode(ids).strip())
    return outputs


def evaluate_generation(lm: LM, examples: Sequence[Example], num_beams: int = 1, progress: bool = False,
                        titles: TitleOptions | None = None) -> dict:
    spec = lm.task or TaskSpec()
    predictions = generate_outputs(lm, spec, [e.input for e in examples], num_beams, progress, titles)
    result = metrics.rouge(predictions, [e.target for e in examples])
    result["perplexity"] = reference_perplexity(lm, spec, examples)
    result["examples"] = len(examples)
    return {"metrics": result, "predictions": predictions}


def evaluate_classification(lm: LM, examples: Sequence[Example], path: str = "") -> dict:
    spec = lm.task
    check_labels(examples, spec.labels, path)
    predicted = lm.classify([e.input for e in examples])
    gold = [e.target for e in examples]
    result = {"accuracy": metrics.accuracy(predicted, gold), "macro_f1": metrics.macro_f1(predicted, gold),
              "perplexity": reference_perplexity(lm, spec, examples), "examples": len(examples)}
    return {"metrics": result, "predictions": predicted}


def _progress(items: Sequence[str], enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="evaluate", unit="example", dynamic_ncols=True)


__all__ = ["evaluate_classification", "evaluate_generation", "generate_outputs", "reference_perplexity"]
