from .environment import environment_info, environment_markdown
