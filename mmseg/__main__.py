import sys

from mmseg.cli import main

sys.exit(main())
