"""`lidit submit ...` and `lidit jobs ...`: jobs on a Ray cluster through the Ray Jobs API."""

from lidit.jobs.cluster import jobs, submit
from lidit.jobs.commands import Command

SUBMIT = Command(submit.run, add_arguments=submit.add_arguments)
JOBS = Command(jobs.run, add_arguments=jobs.add_arguments)
