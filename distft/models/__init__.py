"""Models: loading (hub ids and local paths, safetensors only), fine-tuning methods, export, the shipped tiny base."""
