"""Jinja templates (data). Installed as vlm.templates so wheels find them."""
