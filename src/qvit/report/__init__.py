from .environment import environment_info, environment_markdown, write_benchmark_record
from .runs import append_run, load_runs, settings_tag
