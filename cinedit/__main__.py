import sys

from cinedit.cli import main

sys.exit(main())
