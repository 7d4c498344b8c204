"""Offline analysis of stored memories (python -m store.analyze, store/analyze.py), one module per concern:

    groups.py    which store groups a RUN names, streaming them in slices, sampling chunks
    reload.py    the plan and the weights that wrote a group, loaded through compiler.load; the read-out that decodes it
    decode.py    `decode` (original vs decoded text) and `info` (information metrics)
    retrieve.py  `retrieve` (n-gram / n-bag retrieval over stored memories)
    quantize.py  `quantize` (decoding from memories cast to bfloat16, float8, int8)
    figures.py   `plot` (memory PCA, accuracy by position, metric curves)

The store never runs a model itself: decoding and query encodings are compiler.load.Loaded.read_out and .encode
(the graph's own read-out, compiler/model.py), which this package asks for logits and embeddings of arrays.
"""
