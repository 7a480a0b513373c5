import sys

from rpg.launch.submit import main

sys.exit(main())
