import sys

from flux_proxy.cli import main

sys.exit(main())
