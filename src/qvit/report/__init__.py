from .environment import environment_info, environment_markdown, write_benchmark_record
from .runs import append_run, load_run_history, load_runs, settings_tag
