"""The serving verbs: ``serve`` (the API and the site) and ``dashboard`` (a run's live metrics)."""

from __future__ import annotations

import argparse

from cpmlive.cli.common import (Verbs, add_memory_limit, count, memory_size, port_number, positive_int,
                                positive_seconds)


def add_dashboard(verbs: Verbs) -> None:
    dash = verbs.add_parser("dashboard", help="serve a live web dashboard of a run's metrics")
    dash.add_argument("run_dir")
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=port_number, default=8765)
    dash.set_defaults(run=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> None:
    from cpmlive.serve.dashboard import serve

    serve(args.run_dir, host=args.host, port=args.port)


def add_serve(verbs: Verbs) -> None:
    srv = verbs.add_parser("serve", help="serve a model: the OpenAI-compatible API, fill/title/classify, and the site")
    srv.add_argument("model_path", nargs="?", metavar="MODEL", help="checkpoint directory, 'demo', or a preset name")
    srv.add_argument("--model", default="demo", help=argparse.SUPPRESS)
    srv.add_argument("--adapter", action="append", metavar="[NAME=]PATH",
                     help="adapter directory or shipped name (repeatable; default for demo: the shipped ones)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=port_number, default=8000)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (or set CPMLIVE_API_KEY)")
    srv.add_argument("--max-batch", type=positive_int, default=32, help="requests decoded together (default 32)")
    srv.add_argument("--max-waiting", type=count, default=64,
                     help="requests queued beyond a full batch before answering 503 (default 64)")
    srv.add_argument("--timeout", type=positive_seconds, default=600.0, help="seconds a request may take (default 600)")
    srv.add_argument("--max-connections", type=positive_int, default=1000,
                     help="open connections at once; one more is answered 503 (default 1000, within the open-file "
                          "limit)")
    srv.add_argument("--header-timeout", type=positive_seconds, default=20.0,
                     help="seconds for a request's headers to arrive before the connection is closed, and "
                          "again for its body after them before a 408 (default 20)")
    srv.add_argument("--cors-origin", action="append", help="allow browser pages from this origin (repeatable)")
    srv.add_argument("--run-dir", help="a training run whose live dashboard the site shows at /dashboard")
    srv.add_argument("--served-name", help="the base model's name in /v1/models (default: its directory's)")
    srv.add_argument("--assistant-model", metavar="MODEL", help="speculative decoding: a smaller model with the "
                     "same vocabulary drafts tokens for every request (a body's use_assistant_model: false opts out)")
    srv.add_argument("--prefix-cache", type=memory_size, default=None, metavar="SIZE",
                     help="prompt keys and values kept across requests (default 256MB; 0: off)")
    srv.add_argument("--bee-prompt-field", metavar="KEY", default=None,
                     help='CPM-Bee: the task key a completion prompt goes in, {KEY: prompt, "<ans>": ""} '
                          "(default input)")
    add_memory_limit(srv)
    srv.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    from cpmlive.resources import shipped_adapters
    from cpmlive.serve.app import serve
    from cpmlive.serve.dashboard import check_run_dir

    from cpmlive.serve.runtime import Settings

    model = args.model_path or args.model
    adapters = args.adapter
    if adapters is None:  # the demo model comes with its adapters
        adapters = shipped_adapters() if model == "demo" else []
    run_dir = check_run_dir(args.run_dir) if args.run_dir else None
    if args.bee_prompt_field is not None:
        from cpmlive.data.bee_chat import check_text_field

        check_text_field(args.bee_prompt_field)
    settings = Settings(api_key=Settings.key_from_environment(args.api_key), max_batch=args.max_batch,
                        max_waiting=args.max_waiting, timeout=args.timeout, cors_origins=tuple(args.cors_origin or ()),
                        run_dir=run_dir, served_name=args.served_name, memory_limit=args.memory_limit,
                        max_connections=args.max_connections, header_timeout=args.header_timeout,
                        assistant_model=args.assistant_model, prefix_cache_bytes=args.prefix_cache,
                        bee_prompt_field=args.bee_prompt_field)
    serve(model, adapters=adapters, host=args.host, port=args.port, settings=settings)
