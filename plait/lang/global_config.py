"""Process-wide settings of the frontend language (SGLang's `global_config`)."""

from __future__ import annotations

from typing import Any


class GlobalConfig:
    def __init__(self) -> None:
        self.verbosity = 0  # >= 2: print each program's final text
        self.default_backend: Any = None
        # Forwarded in every generation request's sampling_params.
        self.skip_special_tokens_in_output = True
        self.spaces_between_special_tokens_in_out = True
        # fork(n > 1) first commits the shared prefix (max_new_tokens=0) so every branch hits the cache.
        self.enable_fork_hint = True
        # run_batch of more than one program first sends the program's constant prefix.
        self.enable_precache_with_tracing = True
        # join("concate_and_append") may ask the backend to splice KV caches (else: text).
        self.enable_parallel_encoding = True
        # A program's expressions run on a worker thread and fork branches run concurrently. False:
        # they run synchronously in the program body's thread, branches one after another (the
        # paper's "no frontend parallelism" ablation; run_batch still runs programs concurrently).
        self.enable_parallel_execution = True
        # A traced constant prefix shorter than this is not worth a separate request.
        self.precache_min_chars = 64


global_config = GlobalConfig()
