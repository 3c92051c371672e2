"""The server's own configuration section, and the command line of `launch_server` / `plait serve`.

The flags are generated from the runtime configuration dataclasses (`plait.runtime.config`) and
`ServerConfig` below, with SGLang's names (`--model-path`, `--port`, `--tp-size`, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from plait.runtime.config import option

LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]


@dataclass(frozen=True)
class ServerConfig:
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(30000, "port to listen on")
    tp_size: int = option(1, "tensor parallelism: processes (one per GPU) that one model is split over; on the CPU "
                             "they talk over gloo")
    dp_size: int = option(1, "data parallelism: model replicas behind this server, each with its own scheduler "
                             "and prefix cache")
    load_balance_method: str = option("cache_aware", "how requests are spread over the --dp-size replicas: "
                                      "cache_aware (where the prompt's prefix was sent, unless loads are uneven), "
                                      "round_robin, random, power_of_two (the less loaded of two random replicas)")
    nnodes: int = option(1, "machines that the tensor-parallel ranks span")
    node_rank: int = option(0, "this machine's index among --nnodes; node 0 serves HTTP, the others run ranks only")
    dist_init_addr: str | None = option(None, "HOST:PORT where the ranks meet (on node 0, reachable from every "
                                              "node); default: a free port on this machine")
    api_key: str | None = option(None, "when set, every request but health and metrics needs "
                                       "`Authorization: Bearer KEY`; default: no key asked")
    served_model_name: str | None = option(None, "the model id clients see; default: --model-path, or the "
                                                 "default model's name")
    log_level: str = option("info", "level of the server's log")
    log_requests: bool = option(False, "log every request and its result")
    enable_metrics: bool = option(False, "serve Prometheus metrics at /metrics")
    stats_log_interval: float = option(5.0, "seconds between stats lines while busy; 0: none")
    shutdown_timeout: float = option(10.0, "on SIGTERM, seconds in-flight requests get to finish before "
                                           "they are aborted")
    health_check_timeout: float = option(20.0, "seconds /health_generate waits for its test generation")
    max_request_body_bytes: int = option(4 << 20, "larger request bodies are refused with 413")
    tool_call_parser: str | None = option(None, "how the model writes tool calls (OpenAI chat `tools`); default: "
                                                "the format its chat template uses")

    def __post_init__(self) -> None:
        for name in ("tp_size", "dp_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes - 1}], got {self.node_rank}")
        if self.tp_size % self.nnodes:
            raise ValueError(f"--tp-size {self.tp_size} does not split over --nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")
        if self.nnodes > 1 and self.dp_size > 1:
            raise ValueError("--dp-size > 1 runs on one node; for replicas on several machines, run a server on "
                             "each and put `plait router` in front of them")
        if self.load_balance_method not in _routing_policies():
            raise ValueError(f"--load-balance-method must be one of {', '.join(_routing_policies())}, "
                             f"got {self.load_balance_method!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.tool_call_parser is not None and self.tool_call_parser not in _tool_call_parsers():
            raise ValueError(f"--tool-call-parser must be one of {', '.join(_tool_call_parsers())},"
                             f" got {self.tool_call_parser!r}")
        if self.max_request_body_bytes < 1024:
            raise ValueError(f"--max-request-body-bytes must be at least 1024, got {self.max_request_body_bytes}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")

    def model_name(self, model_path: str | None) -> str:
        """The id of the served model: --served-model-name, else --model-path, else the default model's name."""
        if self.served_model_name:
            return self.served_model_name
        if model_path:
            return model_path
        from plait.runtime.model_loader.default_model import DEFAULT_MODEL_FILE

        return DEFAULT_MODEL_FILE.split(".")[0]


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """All flags: the runtime sections (model, memory, scheduler) and the server section."""
    from plait.runtime.cli_args import add_runtime_args, add_section_args

    add_section_args(parser, "server", ServerConfig,
                     choices={"log_level": LOG_LEVELS, "tool_call_parser": _tool_call_parsers(),
                              "load_balance_method": _routing_policies()})
    add_runtime_args(parser)


def _routing_policies() -> list[str]:
    from plait.router.policy import ROUTING_POLICIES

    return list(ROUTING_POLICIES)


def _tool_call_parsers() -> list[str]:
    from plait.runtime.server.tool_parser import TOOL_CALL_PARSERS

    return list(TOOL_CALL_PARSERS)


def configs_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], ServerConfig]:
    """(runtime options for `RuntimeConfig.from_options`, server config); raises ValueError on bad values."""
    from plait.runtime.cli_args import runtime_options

    names = {f.name for f in dataclasses.fields(ServerConfig)}
    server = ServerConfig(**{k: v for k, v in vars(args).items() if k in names})
    options = runtime_options(args)
    if options.get("model_path"):
        options["model_path"] = os.path.expanduser(options["model_path"])
    return options, server
