"""NVFlare job: fedprox over fedbrain hospitals. `python jobs/fedprox/job.py --help` lists the flags.

Examples:
    python jobs/fedprox/job.py --rounds 5                                   # simulator, embedded Br35H
    python jobs/fedprox/job.py --data-root ../shared/data --rounds 20       # benchmark federation
    python jobs/fedprox/job.py --export-to /tmp/fedprox-job                     # NVFlare job folder
    python jobs/fedprox/job.py --env prod --startup-kit KIT --site-config sites.toml
"""

import sys

from fedbrain.cli.job import job_main

if __name__ == "__main__":
    sys.exit(job_main("fedprox"))
