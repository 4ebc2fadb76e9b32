"""``python -m graven.router.proxy``: run the embedded router (see ``entry.main``)."""

import sys

from graven.router.proxy.entry import main

if __name__ == "__main__":
    sys.exit(main())
