"""What a Stable Diffusion model is, and moving it between formats."""
