"""The engine layer: datasets, the DALI pipeline and its colour kernel, batches out.

`dataset` (+ `listing`, `headers`, `index_cache`) indexes image folders and manifests;
`statistics` computes and finds a dataset's RGB statistics; `pipeline` is the DALI graph;
`kernels` builds and loads the colour-operator plugin; `augmenter` turns sample ids into
augmented batches; `synth` writes synthetic test images. Import the modules directly:
this package imports nothing, so the ones that need DALI or PIL load only when used.
"""
