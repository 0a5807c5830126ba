"""NVFlare job: scaffold over fedbrain hospitals. `python jobs/scaffold/job.py --help` lists the flags.

Examples:
    python jobs/scaffold/job.py --rounds 5                                   # simulator, embedded Br35H
    python jobs/scaffold/job.py --data-root ../shared/data --rounds 20       # benchmark federation
    python jobs/scaffold/job.py --export-to /tmp/scaffold-job                     # NVFlare job folder
    python jobs/scaffold/job.py --env prod --startup-kit KIT --site-config sites.toml
"""

import sys

from fedbrain.cli.job import job_main

if __name__ == "__main__":
    sys.exit(job_main("scaffold"))
