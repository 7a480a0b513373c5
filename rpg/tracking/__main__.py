import sys

from rpg.tracking.tracker import main

sys.exit(main())
