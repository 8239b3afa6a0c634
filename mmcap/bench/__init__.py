"""Benchmarks (STYLE.md 11: scripts that print tables and write JSON, never timed asserts):
training-step throughput of mmcap against an official-style Hugging Face model
(:mod:`mmcap.bench.train_bench`, :mod:`mmcap.bench.hf_reference`), per-phase timing
(:mod:`mmcap.bench.phases`) and attention back-ends (:mod:`mmcap.bench.attention_bench`)."""
