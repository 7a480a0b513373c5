"""``python -m rpg.sweep SWEEP.yaml [--status | --dry-run] ...``: the sweep command (rpg.launch.sweep)."""

import sys

from rpg.launch.sweep import main

if __name__ == "__main__":
    sys.exit(main())
