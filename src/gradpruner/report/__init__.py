"""The run report (Markdown and HTML) and its plots."""
