"""Every model builder and loader: causal LMs and tokenizers (`loading`), reward models (`reward`), tiny local
language models (`tiny`), diffusion stacks (`diffusion`) and tiny diffusion stacks (`tiny_diffusion`).

Import the submodule you need; this package imports nothing heavy (torch loads with a submodule's functions)."""
