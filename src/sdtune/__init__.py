"""sdtune: fine-tune Stable Diffusion 1.x and 2.x on your own images."""

__version__ = "0.1.0"
