"""`lidit models ...` and `lidit data ...`: offline LLMs and synthetic data sets."""

from lidit.jobs.commands import Command
from lidit.jobs.tools import data, models

MODELS = Command(models.run, add_arguments=models.add_arguments)
DATA = Command(data.run, add_arguments=data.add_arguments)
