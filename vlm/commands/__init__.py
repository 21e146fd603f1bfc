"""Command-line commands, one module per command group; `vlm.cli` assembles them."""
