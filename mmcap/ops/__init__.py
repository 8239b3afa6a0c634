"""Custom and fused operators: each op's Python entry, back-end registry and `*_ref` reference."""
