import sys

from cpmlive.cli import main

sys.exit(main())
