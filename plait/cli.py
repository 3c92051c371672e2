"""The `plait` command: `plait generate PROMPT`, `plait serve [--model-path PATH] ...`, `plait router --worker-urls URL ...`."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _generate(args: argparse.Namespace) -> int:
    from plait.runtime.cli_args import runtime_options
    from plait.runtime.engine import Engine

    with Engine(**runtime_options(args)) as engine:
        prompt = args.prompt
        if not args.raw and engine.tokenizer is not None and engine.tokenizer.chat_template:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt}
            ]
            prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
        if args.seed is not None:
            params["seed"] = args.seed
        printed = ""
        for chunk in engine.generate(prompt, params, stream=True):
            sys.stdout.write(chunk["text"][len(printed):])
            sys.stdout.flush()
            printed = chunk["text"]
        sys.stdout.write("\n")
        if args.verbose:
            print(chunk["meta_info"], file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from plait import __version__
    from plait.runtime.cli_args import add_runtime_args

    # Idle OpenMP workers that spin instead of sleeping starve everything else on a small or shared
    # machine (loading the default model took 3x longer on a busy 2-core one); set before torch loads.
    # A short spin before sleeping keeps the barriers inside a step cheap (runtime/server/launch.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    parser = argparse.ArgumentParser(prog="plait", description="Structured LLM programs and their runtime.")
    parser.add_argument("--version", action="version", version=f"plait {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer one prompt (through the model's chat template) and exit",
                         description="Answer one prompt with a model loaded in this process; the answer streams "
                                     "to stdout.")
    gen.add_argument("prompt", help="the user message (or, with --raw, the whole prompt)")
    gen.add_argument("--system", default=None, help="a system message; default: none")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default: 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed; default: the runtime's --random-seed")
    gen.add_argument("--verbose", action="store_true", help="print the answer's meta_info (token counts, finish "
                                                            "reason) to stderr")
    add_runtime_args(gen)
    from plait.runtime.server.config import add_server_args

    serve = sub.add_parser("serve", help="serve a model over HTTP (SGLang's native API and the OpenAI API)",
                           description="Serve a model over HTTP: SGLang's native API and the OpenAI API.")
    add_server_args(serve)
    from plait.router.config import DESCRIPTION, add_router_args

    router = sub.add_parser("router", help="route requests over several servers by where their prompts' prefixes "
                                           "are cached", description=DESCRIPTION)
    add_router_args(router)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from plait.runtime.server.launch import serve_from_args

        return serve_from_args(args, serve)
    if args.command == "router":
        from plait.router.app import router_from_args

        return router_from_args(args, router)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from plait.runtime.model_loader import ModelLoadError
    from plait.runtime.frontend.errors import InvalidRequestError

    try:
        if args.command == "generate":
            return _generate(args)
    except (ModelLoadError, InvalidRequestError, ValueError) as e:
        print(f"plait: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
