import sys

from densenet.cli import main

sys.exit(main())
