"""NVFlare job: fedavg over fedbrain hospitals. `python jobs/fedavg/job.py --help` lists the flags.

Examples:
    python jobs/fedavg/job.py --rounds 5                                   # simulator, embedded Br35H
    python jobs/fedavg/job.py --data-root ../shared/data --rounds 20       # benchmark federation
    python jobs/fedavg/job.py --export-to /tmp/fedavg-job                     # NVFlare job folder
    python jobs/fedavg/job.py --env prod --startup-kit KIT --site-config sites.toml
"""

import sys

from fedbrain.cli.job import job_main

if __name__ == "__main__":
    sys.exit(job_main("fedavg"))
