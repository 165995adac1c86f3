"""Adapters at the edge: transformers (``load_model``, the ``from_pretrained`` drop-in) and peft
(``load_lora``). Each submodule imports its framework only when one of its functions runs, so
importing ``fastckpt`` never imports transformers or peft.
"""
