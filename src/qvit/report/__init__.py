from .environment import environment_info, environment_markdown, write_benchmark_record
