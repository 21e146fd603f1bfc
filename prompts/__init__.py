"""Label-set YAML files (data). Installed as vlm.prompts so wheels find them."""
