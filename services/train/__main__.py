import sys

from services.train.cli import main

sys.exit(main())
