"""The verbs that run a model on text: ``generate``, ``fill``, ``bee``, ``chat`` and ``title``."""

from __future__ import annotations

import argparse
import json
import sys

from cpmlive.cli.common import (Verbs, add_assistant_flag, add_decoding_flags, add_generation_flags, add_model_flags,
                                add_structure_flags, bounded_int, count, finite_float, generation_kwargs, load_lm,
                                positive_int, print_json, prompt_from, read_text_file, warnings_as_lines)
from cpmlive.errors import CpmliveError


def add_generate(verbs: Verbs) -> None:
    gen = verbs.add_parser("generate", help="continue a prompt")
    add_generation_flags(gen, default_new_tokens=None)  # 64, or what the model's generation config says
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--input", default=None, help="the text for the prompt's {input} slot (a few-shot prompt file)")
    gen.add_argument("--num-return-sequences", type=bounded_int(1, 256), default=None, metavar="K",
                     help="generate K continuations (sampled with --do-sample or --vote)")
    gen.add_argument("--vote", action="store_true",
                     help="sample K answers, cut each at its first line break or --stop, print the most frequent")
    gen.add_argument("--stop", action="append", default=None, help="a string that ends an answer (repeatable)")
    add_assistant_flag(gen)
    add_structure_flags(gen)
    gen.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> None:
    from cpmlive.infer.vote import fill_template

    prompt = fill_template(prompt_from(args), args.input)
    samples = args.num_return_sequences
    if args.vote and samples is None:
        raise CpmliveError("--vote needs --num-return-sequences K (the number of answers to sample)")
    if samples is not None and args.stream:
        raise CpmliveError("--stream prints one continuation; drop --num-return-sequences")
    lm = load_lm(args)
    kwargs = generation_kwargs(args)
    if args.vote:
        result = lm.vote(prompt, samples, stop=args.stop or (), **{"max_new_tokens": 64, **kwargs})
        if args.json:
            print_json(result.to_dict())
            return
        print(f"{result.answer}\t({result.count}/{result.total})")
        for answer, count in result.distribution:
            print(f"  {count:>3}  {answer!r}", file=sys.stderr)
        return
    if samples is not None:
        texts = lm.sample(prompt, samples, **kwargs)
        print_json({"texts": texts}) if args.json else print("\n---\n".join(texts))
        return
    if args.stream:
        if args.json:
            raise CpmliveError("--stream prints plain text; drop --json")
        for piece in lm.stream(prompt, **kwargs):
            print(piece, end="", flush=True)
        print()
        return
    if lm.can("bee"):  # CPM-Bee decodes its text-generation task: no token row to show
        text = lm.generate(prompt, **kwargs)
        print_json({"text": text}) if args.json else print(text)
        return
    ids = lm.generate_ids([prompt], **kwargs)[0]
    text = lm.tokenizer.decode(ids)
    if not args.json:
        print(text)
        return
    stats = lm.engine.stats()
    speculation = {"drafted_tokens": stats["drafted_tokens"], "kept_tokens": stats["kept_tokens"],
                   "acceptance_rate": round(stats["kept_tokens"] / max(stats["drafted_tokens"], 1), 4)}
    print_json({"text": text, "ids": ids, **({"speculative": speculation} if stats["drafted_tokens"] else {})})


def add_fill(verbs: Verbs) -> None:
    fill = verbs.add_parser("fill", help="fill every <mask> in the text (blank infilling)")
    add_generation_flags(fill, default_new_tokens=4)
    fill.add_argument("--blank-length", type=positive_int, action="append",
                      help="try this blank length (repeatable; default 1..--max-new-tokens)")
    fill.set_defaults(run=cmd_fill)


def cmd_fill(args: argparse.Namespace) -> None:
    text = prompt_from(args)
    lm = load_lm(args)
    kwargs = generation_kwargs(args)
    fills = lm.fill(text, blank_lengths=args.blank_length, return_fills=True, **kwargs)
    parts = text.split("<mask>")
    filled = "".join(p + (fills[i] if i < len(fills) else "") for i, p in enumerate(parts))
    print_json({"text": filled, "fills": fills}) if args.json else print(filled)


def add_bee(verbs: Verbs) -> None:
    bee = verbs.add_parser("bee", help="fill the <ans> fields of a CPM-Bee JSON task")
    bee.add_argument("model", help="CPM-Bee checkpoint directory, 'bee-demo', or a preset name")
    bee.add_argument("task", nargs="?", help="the task as JSON, e.g. "
                     '\'{"input": "...", "prompt": "中翻英", "<ans>": ""}\', or - to read stdin')
    bee.add_argument("--file", help="read the task (one JSON object, or one per line) from a UTF-8 file")
    bee.add_argument("--example", action="append", default=[], metavar="JSON",
                     help="an in-context example every task reads first: a task with its <ans> filled "
                     "(repeat for several; CPM-Bee's pretraining packs them so)")
    add_decoding_flags(bee, default_new_tokens=64)
    bee.add_argument("--batch-size", type=positive_int, default=8, help="tasks decoded together")
    bee.add_argument("--json", action="store_true", help="print each filled object as one line of JSON")
    add_model_flags(bee)
    bee.set_defaults(run=cmd_bee)


def bee_tasks(args: argparse.Namespace) -> list[dict]:
    """The tasks of ``cpmlive bee``: one JSON object (argument, ``-`` or ``--file``), or a file
    of one object per line."""
    from cpmlive.data.bee_json import parse_task

    if args.file and args.task is not None:
        raise CpmliveError("give the task or --file, not both")
    if not args.file and args.task is None:
        raise CpmliveError("no task given (pass a JSON object, --file PATH, or - for stdin)")
    source = args.file or "argument"
    text = read_text_file(args.file) if args.file else read_text_file("-") if args.task == "-" else args.task
    stripped = text.strip()
    if not stripped:
        raise CpmliveError(f"{source}: empty input")
    lines = [line for line in stripped.splitlines() if line.strip()]
    if len(lines) > 1 and all(line.lstrip().startswith("{") and line.rstrip().endswith("}") for line in lines):
        try:
            return [parse_task(line, f"{source} line {n}") for n, line in enumerate(lines, 1)]
        except CpmliveError:
            pass  # not JSONL: one object over several lines
    return [parse_task(stripped, source)]


def cmd_bee(args: argparse.Namespace) -> None:
    from cpmlive.data.bee_json import check_example, parse_task

    tasks = bee_tasks(args)
    examples = [check_example(parse_task(text, f"--example {n}"), f"--example {n}")
                for n, text in enumerate(args.example, 1)]
    lm = load_lm(args)
    kwargs = generation_kwargs(args)
    for start in range(0, len(tasks), args.batch_size):
        for filled in lm.bee(tasks[start:start + args.batch_size], examples=examples, **kwargs):
            text = json.dumps(filled, ensure_ascii=False, indent=None if args.json else 2)
            print(text, flush=True)


def add_chat(verbs: Verbs) -> None:
    chat = verbs.add_parser("chat", help="talk to a chat-tuned model (streaming; /reset, /exit)")
    chat.add_argument("model")
    chat.add_argument("--system", default=None, help="a system message that opens the conversation")
    chat.add_argument("--max-new-tokens", type=positive_int, default=None,
                      help="default: 128, or what the model's generation_config.json says")
    chat.add_argument("--temperature", type=finite_float, default=None,
                      help="0: greedy (default: greedy, or what the model's generation_config.json says)")
    chat.add_argument("--top-p", type=finite_float, default=None)
    chat.add_argument("--seed", type=count, default=None)
    add_assistant_flag(chat)
    add_model_flags(chat)
    chat.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> None:
    lm = load_lm(args)
    lm.chat_template()  # refuse a model without one before the first prompt
    options = {"top_p": args.top_p, "seed": args.seed}  # None: the model's generation config, or the default
    if args.assistant_model:
        lm.set_assistant(args.assistant_model)
    if args.temperature is not None:
        options.update(do_sample=args.temperature > 0, temperature=args.temperature or 1.0)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("用户> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        pieces = []
        with warnings_as_lines():
            for piece in lm.chat_stream(messages, max_new_tokens=args.max_new_tokens, **options):
                pieces.append(piece)
                print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})


def add_title(verbs: Verbs) -> None:
    title = verbs.add_parser("title", help="candidate headlines for an article (智取标题)")
    title.add_argument("text", nargs="?", help="the article, or - to read stdin")
    title.add_argument("--file", help="read the article from a UTF-8 file")
    title.add_argument("--model", default="demo", help="base model (default: demo, with the shipped headline adapter)")
    title.add_argument("-n", type=positive_int, default=5, help="number of candidates")
    title.add_argument("--num-beams", type=count, default=6)
    title.add_argument("--samples", type=count, default=8, help="sampled candidates besides the beams")
    title.add_argument("--lead-sentences", type=count, default=2,
                       help="also rank the clauses of the article's first N sentences (0: generated titles only)")
    title.add_argument("--min-chars", type=positive_int, default=4)
    title.add_argument("--max-chars", type=positive_int, default=40)
    title.add_argument("--seed", type=count, default=0)
    title.add_argument("--json", action="store_true", help='print {"titles": [...]}')
    title.add_argument("--prompt-file", help=argparse.SUPPRESS)
    add_model_flags(title)
    title.set_defaults(run=cmd_title)


def cmd_title(args: argparse.Namespace) -> None:
    if args.file and args.text is not None:
        raise CpmliveError("give the article or --file, not both")
    article = read_text_file(args.file) if args.file else prompt_from(args)
    if not article.strip():
        raise CpmliveError("the article is empty")
    from cpmlive.model.registry import check_model

    check_model(args.model)
    from cpmlive.apps.headline import TitleOptions, suggest_titles

    options = TitleOptions(n=args.n, num_beams=args.num_beams, samples=args.samples, min_chars=args.min_chars,
                           max_chars=args.max_chars, seed=args.seed, lead_sentences=args.lead_sentences)
    if args.adapter is None and args.model == "demo":
        args.adapter = ["headline"]
    with warnings_as_lines():
        titles = suggest_titles(load_lm(args), article, options)
    if args.json:
        print_json({"titles": titles})
    else:
        print("\n".join(titles))
