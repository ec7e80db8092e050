import sys

from mtl_cli.cli import main

sys.exit(main())
