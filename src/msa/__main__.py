import sys

from msa.cli import main

sys.exit(main())
