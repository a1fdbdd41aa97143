import sys

from pluresync.cli import main

sys.exit(main())
