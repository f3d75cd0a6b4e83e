"""``cpmlive classify``: zero- and few-shot classification with a template and a verbalizer
(``apps.prompt_classify``), accuracy on labelled data (mean ± std over seeds when few-shot)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cpmlive.cli.common import Verbs, add_force, add_model_flags, count, load_lm, positive_int, print_json
from cpmlive.errors import CpmliveError
from cpmlive.utils import check_output


def add_classify(verbs: Verbs) -> None:
    cl = verbs.add_parser("classify", help="zero-/few-shot classification by a template and a verbalizer "
                          "(OpenPrompt's prompt learning), accuracy on labelled JSONL")
    cl.add_argument("model")
    cl.add_argument("--template", required=True, help="the template, or a file holding it: fields of the example "
                    "in braces ({text_a}), one {mask}, soft tokens ({soft}, {soft*4}, {soft:TEXT}); OpenPrompt's "
                    "{\"placeholder\": \"text_a\"} syntax too")
    cl.add_argument("--verbalizer", required=True, help="label words: a YAML/JSON file ({label: [words]}, or "
                    "{kind: knowledgeable|soft, words: ...}) or label=word|word,label=word")
    cl.add_argument("--data", required=True, help="labelled JSONL to classify (its fields fill the template)")
    cl.add_argument("--train", default=None, help="labelled JSONL the few-shot examples are drawn from")
    cl.add_argument("--shots", type=count, default=0, help="examples per class (0: zero-shot)")
    cl.add_argument("--tune", action="store_true", help="few-shot by prompt tuning (the template's soft tokens, "
                    "the model frozen) instead of in-context examples")
    cl.add_argument("--seeds", type=positive_int, default=3, help="few-shot runs, each with shots drawn anew")
    cl.add_argument("--calibrate", nargs="?", const="contextual", default=None,
                    choices=("contextual", "pmi", "support"), help="contextual calibration (default), "
                    "domain-conditional PMI, or the prior over support texts (KPT: --train's texts, else "
                    "--data's, unlabeled)")
    cl.add_argument("--label-field", default="label")
    cl.add_argument("--steps", type=positive_int, default=30, help="prompt tuning steps")
    cl.add_argument("--lr", type=float, default=0.05, help="prompt tuning learning rate")
    cl.add_argument("--limit", type=positive_int, default=None, help="classify the first N examples only")
    cl.add_argument("--predictions", default=None, help="write the first run's predictions here (JSONL)")
    cl.add_argument("--json", action="store_true")
    add_force(cl)
    add_model_flags(cl)
    cl.set_defaults(run=cmd_classify)


def cmd_classify(args: argparse.Namespace) -> None:
    from cpmlive.apps import prompt_classify
    from cpmlive.tune.prompting import Template, Verbalizer

    text = Path(args.template).read_text(encoding="utf-8").strip() if Path(args.template).is_file() else args.template
    template, verbalizer = Template.parse(text), Verbalizer.load(args.verbalizer)
    test = prompt_classify.read_examples(args.data, args.label_field, verbalizer.labels)[:args.limit]
    train = prompt_classify.read_examples(args.train, args.label_field, verbalizer.labels) if args.train else []
    if args.shots and not train:
        raise CpmliveError("--shots draws its examples from --train FILE")
    if args.predictions:
        check_output(Path(args.predictions), args.force)
    mode = "zero" if not args.shots else "tune" if args.tune else "icl"
    lm = load_lm(args)
    report = prompt_classify.run(lm, template, verbalizer, test, train, args.shots, mode, range(args.seeds),
                                 args.calibrate, args.label_field, args.steps, args.lr, support=train)
    if args.predictions:
        from cpmlive.utils import atomic_write_text

        atomic_write_text(Path(args.predictions), "".join(json.dumps({**e, "predicted": p}, ensure_ascii=False) + "\n"
                                                          for e, p in zip(test, report.predictions)))
    result = {**report.to_dict(), "examples": len(test),
              "majority": prompt_classify.majority(train, test, args.label_field)}
    if args.json:
        print_json(result)
        return
    mean, std = report.mean_std
    spread = f" ± {std:.4f} over {len(report.accuracies)} seeds" if mode != "zero" else ""
    calibrated = f", calibrated ({args.calibrate})" if args.calibrate else ""
    print(f"{mode}-shot{'' if mode == 'zero' else f' ({args.shots} per class)'}{calibrated}: accuracy "
          f"{mean:.4f}{spread} on {len(test)} examples (majority class {result['majority']:.4f})"
          + (f"; {report.truncated} inputs cut to the model's window" if report.truncated else ""))
