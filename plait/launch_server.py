"""`python -m plait.launch_server --model-path PATH [options]`: SGLang's launch command."""

from __future__ import annotations

import sys

from plait.runtime.server.launch import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m plait.launch_server"))
