"""Training recipes (LightningCLI YAML) shipped as package data, one folder per task."""

if __name__ != "visionzoo.recipes":
    raise ImportError(f"this package is visionzoo.recipes, not {__name__!r}; install visionzoo and use its recipes")
