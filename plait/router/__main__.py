import sys

from plait.router.app import main

sys.exit(main(prog="python -m plait.router"))
