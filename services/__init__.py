"""Boomerang core, in parts that import only downwards (`app` imports `engine.interface` and `errors` only):

    cli      the `boomerang` console script: any part, and `app` for `serve`
    bench    ->  engine, eval, family, store, cpu
    engine   ->  family, store, cpu
    train, eval  ->  family, store, cpu, corpora (never each other)
    family   ->  store, cpu      plans, assembly, KV cache pieces, loading a pair
    store, cpu, corpora          manifests and weight files; native kernels and huge pages; texts
    errors                       imported by every part

`cpu` imports no other part: `family` prepares weights with it (`FastLinear`, huge pages), and the native
decode step, which needs the architecture table and the KV buffers, lives in `engine`.
"""
