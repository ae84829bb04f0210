import sys

from . import main_argv

sys.exit(main_argv())
