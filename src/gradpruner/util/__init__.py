"""Small utilities every stage uses: atomic writes, process groups, tables, option generation."""
