"""Dataset preparation: safe image opening, the metadata JSON, caption/tag cleaning, aspect-ratio buckets and the
VAE latent cache. Each module is one stage; see docs/metadata.md for the files they read and write."""
