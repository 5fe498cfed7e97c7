"""python -m largebatch -> largebatch.cli.main()"""

import sys

from largebatch.cli import main

sys.exit(main())
