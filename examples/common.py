"""Shared by the examples: connect to a Plait (or SGLang) server, or run the model in-process.

    python examples/few_shot_qa.py                      # the server at http://127.0.0.1:30000
    python examples/few_shot_qa.py --url http://host:port --api-key KEY
    python examples/few_shot_qa.py --in-process         # no server: plait.Engine on the default model
"""

from __future__ import annotations

import argparse

import plait as sgl


def setup(description: str, **extra_args: dict) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default="http://127.0.0.1:30000", help="a running `python -m plait.launch_server`")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--in-process", action="store_true", help="load the default model here instead")
    for name, kwargs in extra_args.items():
        parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)
    args = parser.parse_args()
    if args.in_process:
        sgl.set_default_backend(sgl.Engine())
    else:
        sgl.set_default_backend(sgl.RuntimeEndpoint(args.url, api_key=args.api_key))
    return args
