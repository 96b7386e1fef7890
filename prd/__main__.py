import sys

from prd.cli import main

sys.exit(main())
