"""C{python -m mydataproxy.workers}: one worker process (L{mydataproxy.workers.worker}), as the supervisor starts it."""

import sys

from mydataproxy.workers.worker import main

sys.exit(main())
