import sys

from speq.cli import main

sys.exit(main())
