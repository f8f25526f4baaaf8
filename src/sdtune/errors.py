"""One error family for everything a user can fix; the CLI prints these without a traceback."""


class SdtuneError(Exception):
    """A problem with the user's input or setup. The message names the file and the fix."""


class ModelLoadError(SdtuneError):
    """A model file or folder could not be read as a Stable Diffusion model."""


class ConversionError(SdtuneError):
    """A state dict did not match the expected layout (a key that no rule maps, or a missing key)."""
