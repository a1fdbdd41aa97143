"""
`python bench/profiled_twist.py PROFILE_FILE PLUGIN [OPTIONS]`: run a `twist`
plugin under cProfile and write the profile when the reactor stops.

`python -m cProfile -m twisted ...` writes nothing: after a SIGINT/SIGTERM
shutdown `twist` re-raises the signal with its default action, which kills
the process before cProfile can save.  Here that last step is skipped.
"""

import cProfile
import os
import sys
import time

from twisted.application.twist import _twist


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    _twist._exitWithSignal = lambda sig: None
    cpu = os.environ.get("PLURESYNC_PROFILE_CLOCK") == "cpu"  # see bench/profile_stream.py --cpu-clock
    profiler = cProfile.Profile(time.process_time) if cpu else cProfile.Profile()
    profiler.enable()
    try:
        _twist.Twist.main(["twist", *argv])
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
