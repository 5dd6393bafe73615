import sys

from serve_app.ops.cli import main

sys.exit(main())
