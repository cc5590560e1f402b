"""``python -m trainer.jobs > docs/parameters.md``: the parameter table, generated from the field declarations."""
import sys

from trainer.jobs.docs import parameter_table_markdown

sys.stdout.write(parameter_table_markdown())
