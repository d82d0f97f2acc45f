import sys

from controller.surface.cli import main

sys.exit(main())
