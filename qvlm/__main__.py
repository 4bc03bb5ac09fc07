"""`python -m qvlm ...` = the `qvlm` command (qvlm.cli)."""
import sys

from .cli import main

sys.exit(main())
