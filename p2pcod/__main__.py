import sys

from p2pcod.cli import main

sys.exit(main())
