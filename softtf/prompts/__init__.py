"""Prompts for frozen ViTs: prefix attention through ``softtf.prefix_attention``, prompt tokens, the
learnable prompt containers of L2P, DualPrompt and NoRGa (the methods live in ``softtf.methods``)."""
from .attention import PREFIX_ACTIVATIONS, Prefix, disable_prefixes, enable_prefixes, prompting
from .params import PrefixPrompts, TokenPromptPool
from .vit import POOLS, PromptedViT, clip_layers

__all__ = ["PREFIX_ACTIVATIONS", "Prefix", "disable_prefixes", "enable_prefixes", "prompting", "PrefixPrompts",
           "TokenPromptPool", "POOLS", "PromptedViT", "clip_layers"]
