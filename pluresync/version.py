"""
The version of pluresync, alone in its module: reading it (C{--version},
C{/health}, setup.cfg) must import nothing else.
"""

__version__ = "0.1.0"
