"""Old import path of the frontend's settings (`from sglang.global_config import global_config`)."""

from plait.lang.global_config import GlobalConfig, global_config

__all__ = ["GlobalConfig", "global_config"]
