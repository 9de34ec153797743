"""`python -m node`: the same as `macmesh node`."""

import sys

from macmesh.cli import main

sys.exit(main(["node", *sys.argv[1:]]))
