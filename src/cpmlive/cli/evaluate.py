"""``cpmlive evaluate``: one of five evaluations, as the flags say (:func:`evaluation`):

* ``--tasks``: lm-evaluation-harness tasks (``apps.harness``): our local ones offline, the
  harness's own where their datasets can be fetched;
* ``--pairs``: preference pairs, pair accuracy and mean margin;
* on a model whose family answers JSON tasks (CPM-Bee), ``--data``: the answers' metrics, or
  ``--text``: the loss of each line as one answer;
* ``--data``: a task's metrics (ROUGE for generate, accuracy and macro-F1 for classify);
* ``--text``: bits per character and perplexity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from cpmlive.cli.common import (Verbs, add_force, add_model_flags, count, load_lm, positive_int, print_json,
                                print_metrics, read_text_file, warnings_as_lines)
from cpmlive.errors import CpmliveError
from cpmlive.utils import check_output


def add_evaluate(verbs: Verbs) -> None:
    ev = verbs.add_parser("evaluate", help="language-model loss of a text file: bits/char and perplexity")
    ev.add_argument("model")
    ev.add_argument("--text", help="UTF-8 text file, one document per line: bits/char and perplexity")
    ev.add_argument("--data", help="task JSONL file: ROUGE (generate) or accuracy/macro-F1 (classify)")
    ev.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated: cpmlive_sentiment, "
                    "cpmlive_headline, cpmlive_poem, cpmlive_gloss (over `cpmlive data tasks` files), cpmlive_clue "
                    "(AFQMC, CMNLI from the hub), task YAML files, or the harness's own (C-Eval, CMMLU...); "
                    "the hub needs CPMLIVE_HARNESS_ONLINE=1 and network")
    ev.add_argument("--limit", type=positive_int, default=None, help="with --tasks: the first N examples of each")
    ev.add_argument("--num-fewshot", type=count, default=None, help="with --tasks: in-context examples")
    ev.add_argument("--include", action="append", default=[], metavar="DIR", help="with --tasks: a folder of "
                    "the user's task YAMLs (repeatable)")
    ev.add_argument("--task-data", default=None, metavar="DIR", help="with --tasks: where `cpmlive data tasks` "
                    "wrote the local tasks' files (default: data/tasks)")
    ev.add_argument("--results", default=None, metavar="FILE", help="with --tasks: write the harness's results "
                    "(every sample's scores) here as JSON")
    ev.add_argument("--pairs", help="preference JSONL ({prompt, chosen, rejected}): pair accuracy and mean margin "
                    "(log-probability, or a reward model adapter's score)")
    ev.add_argument("--task", choices=("generate", "classify"), default=None,
                    help="default: the adapter's task, else generate")
    ev.add_argument("--num-beams", type=positive_int, default=None,
                    help="decoding for --task generate (default 1; with --titles, `cpmlive title`'s 6)")
    ev.add_argument("--titles", action="store_true", help="--task generate through the headline generator "
                    "(`cpmlive title` top-1), as the README's figures")
    ev.add_argument("--lead-sentences", type=count, default=None,
                    help="with --titles: rank the clauses of the first N sentences too (0: generated titles only)")
    ev.add_argument("--predictions", help="write the predictions here (JSONL)")
    ev.add_argument("--batch-size", type=positive_int, default=8)
    ev.add_argument("--json", action="store_true")
    add_force(ev)
    add_model_flags(ev)
    ev.set_defaults(run=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> None:
    evaluation(args)(args)


def evaluation(args: argparse.Namespace) -> Callable[[argparse.Namespace], None]:
    """The evaluation the flags ask for: ``--pairs`` stands alone; else ``--data`` (task
    metrics) before ``--text`` (language-model loss), both read as JSON tasks and their answers
    when the model's family answers JSON tasks."""
    if args.tasks:
        if args.text or args.data or args.pairs:
            raise CpmliveError("--tasks is evaluated on its own: drop --text / --data / --pairs")
        return evaluate_harness
    if args.pairs:
        if args.text or args.data:
            raise CpmliveError("--pairs is evaluated on its own: drop --text / --data")
        return evaluate_pairs
    if not args.text and not args.data:
        raise CpmliveError("give --text FILE (language-model loss), --data FILE.jsonl (task metrics) or "
                           "--pairs FILE.jsonl (preference accuracy)")
    if answers_json_tasks(args.model):
        return evaluate_json_tasks
    return evaluate_task if args.data else evaluate_text


def evaluate_harness(args: argparse.Namespace) -> None:
    """lm-evaluation-harness tasks: a table of each task's metrics (``--json``: the results)."""
    from cpmlive.apps.harness import run_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CpmliveError("--tasks names no task")
    if args.results:
        check_output(Path(args.results), args.force)
    lm = load_lm(args)
    results = run_tasks(lm, tasks, limit=args.limit, num_fewshot=args.num_fewshot, include=args.include,
                        data_dir=args.task_data, batch_size=args.batch_size)
    table = {task: {key.split(",")[0]: value for key, value in metrics.items()
                    if "," in key and "stderr" not in key and isinstance(value, (int, float))}
             for task, metrics in results["results"].items()}
    if args.results:
        from cpmlive.utils import atomic_write_text

        atomic_write_text(Path(args.results), json.dumps(results, ensure_ascii=False, indent=1, default=str) + "\n")
    if args.json:
        print_json({"model": args.model, "tasks": table, "n_samples": results.get("n-samples", {})})
        return
    for task, metrics in table.items():
        shots = results.get("n-shot", {}).get(task, 0)
        print(f"{task} ({shots}-shot): " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))


def answers_json_tasks(model: str) -> bool:
    """Whether ``model`` is a checkpoint of a family that answers JSON tasks (``bee``)."""
    from cpmlive.model.registry import family_of
    from cpmlive.resources import model_path

    return model_path(model).exists() and family_of(model).can("bee")


def evaluate_text(args: argparse.Namespace) -> None:
    """Bits per character and perplexity of the text file's lines."""
    from cpmlive.infer.score import score_texts

    text = read_text_file(args.text)
    lm = load_lm(args)
    lm.require("generate")  # a left-to-right loss: an encoder has none
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise CpmliveError(f"{args.text}: no text to evaluate")
    score = score_texts(lm.model, lm.tokenizer, lines, batch_size=args.batch_size, progress=not args.json)
    result = score.to_dict()
    if args.json:
        print_json(result)
    else:
        print(f"bits/char {result['bits_per_char']:.4f}  perplexity {result['perplexity']:.2f}  "
              f"({result['chars']} chars, {result['tokens']} tokens, {result['documents']} documents)")


def evaluate_pairs(args: argparse.Namespace) -> None:
    from cpmlive.align.evaluate import pair_metrics, reward_head_of
    from cpmlive.resources import adapter_path

    lm = load_lm(args)
    adapter = adapter_path(args.adapter[-1]) if args.adapter else None
    metrics = pair_metrics(lm.model, lm.tokenizer, args.pairs, lm.chat_templates.get(lm.active),
                           reward_head_of(adapter, lm.model), batch_size=args.batch_size)
    if args.json:
        print_json(metrics)
    else:
        print(f"pair accuracy {metrics['pair_accuracy']:.4f}  mean margin {metrics['mean_margin']:.4f}  "
              f"({metrics['pairs']} pairs)")


def read_jsonl_tasks(path: str) -> list[dict]:
    from cpmlive.data.bee_json import parse_task

    lines = [(n, line) for n, line in enumerate(read_text_file(path).splitlines(), 1) if line.strip()]
    if not lines:
        raise CpmliveError(f"{path}: no tasks")
    return [parse_task(line, f"{path} line {n}") for n, line in lines]


def evaluate_json_tasks(args: argparse.Namespace) -> None:
    """``evaluate`` on a model that answers JSON tasks (CPM-Bee): answer metrics of filled tasks
    (``--data``), or the loss of each text line as one answer (``--text``)."""
    lm = load_lm(args)
    if args.data:
        from cpmlive.apps.bee_eval import evaluate_tasks

        tasks = read_jsonl_tasks(args.data)
        result = evaluate_tasks(lm, tasks, batch_size=args.batch_size, progress=not args.json,
                                num_beams=args.num_beams or 1)
        metrics = result["metrics"]
    else:
        from cpmlive.infer.bee import text_loss

        lines = [line for line in read_text_file(args.text).splitlines() if line.strip()]
        if not lines:
            raise CpmliveError(f"{args.text}: no text to evaluate")
        metrics = text_loss(lm.model, lm.tokenizer, lines)
    print_metrics(metrics, args.json)


def title_options(args: argparse.Namespace):
    """``--titles``: the headline generator's top title, with `cpmlive title`'s own defaults."""
    if not args.titles:
        if args.lead_sentences is not None:
            raise CpmliveError("--lead-sentences needs --titles")
        return None
    from cpmlive.apps.headline import TitleOptions

    given = {"lead_sentences": args.lead_sentences, "num_beams": args.num_beams}
    return TitleOptions(n=1, **{key: value for key, value in given.items() if value is not None})


def evaluate_task(args: argparse.Namespace) -> None:
    from cpmlive.data.tasks import read_examples
    from cpmlive.apps.evaluate import evaluate_classification, evaluate_generation

    if args.predictions:
        check_output(args.predictions, args.force)
    titles = title_options(args)
    lm = load_lm(args)
    task = args.task or (lm.task.task if lm.task else "generate")
    if titles is not None and task != "generate":
        raise CpmliveError("--titles evaluates a generation task")
    examples = read_examples(args.data, task)
    with warnings_as_lines():
        if task == "classify":
            if lm.task is None or lm.task.task != "classify":
                raise CpmliveError("--task classify needs a classification adapter (--adapter PATH)")
            result = evaluate_classification(lm, examples, args.data)
        else:
            result = evaluate_generation(lm, examples, num_beams=args.num_beams or 1, progress=not args.json,
                                         titles=titles)
    if args.predictions:
        from cpmlive.utils import atomic_write_text

        atomic_write_text(Path(args.predictions), "".join(json.dumps({"prediction": p}, ensure_ascii=False) + "\n"
                                                          for p in result["predictions"]))
    print_metrics(result["metrics"], args.json)
