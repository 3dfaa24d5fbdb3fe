"""Sub-commands of the `sparsegraph` CLI, one module each (see sparsegraph/cli.py)."""
