"""Names that option declarations need without importing torch (so that ``sdtune train --help`` is instant).

The modules that implement them (``models.save``, ``models.hypernetwork``, ``models.text``, ``devices``) import
these; nothing is declared twice.
"""

from __future__ import annotations

SAVE_FORMATS: tuple[str, ...] = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")

# --max_token_length: 75, 150 or 225 tokens (1-3 chunks of CLIP's 77 with <BOS>/<EOS>), as sd-scripts (models.text).
ALLOWED_TOKEN_LENGTHS: tuple[int, ...] = (75, 150, 225)

# Measured in issue 18: sdtune prepare on a CPU took 631 s with --mixed_precision fp16 against 27 s in float32.
# PyTorch's CPU kernels compute fp16 (and, on CPUs without bf16 instructions, bf16) through slow conversion paths.
HALF_ON_CPU_HELP = "fp16/bf16 are for GPUs: on a CPU they are many times slower than float32, 23x for fp16 in prepare"

# --network_module: sd-scripts names a Python module (networks.lora); "lora" is sdtune's short name for the same.
# lycoris.kohya is LyCORIS's sd-scripts entry point (the optional lycoris-lora package).
NETWORK_MODULES: tuple[str, ...] = ("lora", "networks.lora", "lycoris.kohya")
LORA_MODULES: tuple[str, ...] = ("lora", "networks.lora")

# sd-scripts' --hypernetwork_module names a Python module; its hypernetwork_nai is NovelAI's layout, the default.
HYPERNETWORK_MODULES: tuple[str, ...] = ("default", "hypernetwork_nai", "networks.hypernetwork_nai")

# AUTOMATIC1111's activation table, in its order (models.hypernetwork maps each to its torch class). Note "swish" is
# Hardswish there, not SiLU: files written with "swish" depend on it.
A1111_ACTIVATION_NAMES: tuple[str, ...] = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid")
# What --hypernetwork_activation offers: A1111's table plus two of torch's that ComfyUI also knows, and two that
# only A1111 loads.
ACTIVATION_CHOICES: tuple[str, ...] = (*A1111_ACTIVATION_NAMES, "softsign", "mish", "gelu", "silu")
# comfy/hypernetwork.py load_hypernetwork_patch refuses any other activation_func (it logs an error and loads
# nothing).
COMFYUI_ACTIVATIONS: frozenset[str] = frozenset(
    {"linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish"})
NOT_IN_COMFYUI: tuple[str, ...] = tuple(a for a in ACTIVATION_CHOICES if a not in COMFYUI_ACTIVATIONS)

# --torch_compile: torch.compile's backends (torch._dynamo.list_backends() names, as accelerate's dynamo_backend) and
# inductor's modes (accelerate's dynamo_mode).
DYNAMO_BACKENDS: tuple[str, ...] = ("inductor", "aot_eager", "eager", "cudagraphs")
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
