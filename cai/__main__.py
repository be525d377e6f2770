import sys

from cai.cli import main

sys.exit(main())
