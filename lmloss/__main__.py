"""python -m lmloss COMMAND ...: the same as the installed `lmloss` command."""
import sys

from lmloss.cli import main

sys.exit(main())
