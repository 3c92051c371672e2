"""The router's configuration (one frozen dataclass; its flags are generated from the fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plait.runtime.config import option


@dataclass(frozen=True)
class RouterConfig:
    worker_urls: tuple[str, ...] = option((), "the servers to route to (http://HOST:PORT ...); default: none, "
                                              "which is refused: give at least one")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(30000, "port to listen on")
    policy: str = option("cache_aware", "cache_aware (where the prompt's prefix was sent, unless loads are "
                                        "uneven), round_robin, random, power_of_two")
    cache_threshold: float = option(0.5, "cache_aware: share of a prompt a worker must have seen to get it")
    balance_abs_threshold: int = option(32, "cache_aware: loads are uneven when they differ by more than this "
                                            "many requests ...")
    balance_rel_threshold: float = option(1.1, "... and the largest is above the smallest times this")
    max_tree_size: int = option(1 << 22, "cache_aware: characters remembered per worker")
    max_tree_age: float = option(3600.0, "cache_aware: seconds an unused prefix is remembered")
    eviction_interval: float = option(30.0, "seconds between prunings of the prefix tree")
    health_check_interval: float = option(5.0, "seconds between health checks of each worker")
    health_check_timeout: float = option(5.0, "seconds a health check may take")
    health_failure_threshold: int = option(3, "consecutive failures (checks or requests) that take a worker out")
    health_success_threshold: int = option(2, "consecutive passed checks that bring a worker back")
    max_retries: int = option(2, "times a request that never reached a worker is sent to another one")
    request_timeout: float = option(600.0, "seconds to wait for a worker to start answering")
    log_level: str = option("info", "level of the router's log")

    def __post_init__(self) -> None:
        from plait.router.policy import ROUTING_POLICIES

        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(ROUTING_POLICIES)}, got {self.policy!r}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"--cache-threshold must be in [0, 1], got {self.cache_threshold}")
        for url in self.worker_urls:
            if not url.startswith("http://"):
                raise ValueError(f"worker URLs must start with http://, got {url!r}")
        if self.health_failure_threshold < 1 or self.health_success_threshold < 1:
            raise ValueError("--health-failure-threshold and --health-success-threshold must be at least 1")


DESCRIPTION = "Route requests over several servers, each to the one whose prefix cache most probably holds its prompt."


def add_router_args(parser: Any) -> None:
    from plait.router.policy import ROUTING_POLICIES
    from plait.runtime.cli_args import add_section_args

    add_section_args(parser, "router", RouterConfig, choices={"policy": list(ROUTING_POLICIES),
                                                              "log_level": ["debug", "info", "warning", "error"]})
