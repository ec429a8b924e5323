import sys

from pvmit.agent.main import main

sys.exit(main())
