"""Weight-only post-training quantization of causal language models under a bits-per-weight budget.

The public verb is :func:`mixbits.quantize_weights`; this package holds its parts: the group-wise
quantizers (``groupwise``), the storage count (``bpw``), the per-layer error measurement (``measure``),
the allocation (``allocate``) and a small causal LM with a byte-level corpus for tests and benchmarks
(``tiny``, ``corpus``). Nothing here imports ``transformers``: a Hugging Face causal LM is accepted by its
call convention (``model(input_ids)`` returning logits or an object with ``.logits``).
"""
