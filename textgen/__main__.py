import sys

from textgen.cli import main

sys.exit(main())
