"""`python -m macmesh`: the same as the `macmesh` command."""

import sys

from macmesh.cli import main

sys.exit(main())
