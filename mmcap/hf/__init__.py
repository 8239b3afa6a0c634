"""Hugging Face interoperability: key tables between transformers models and mmcap."""
