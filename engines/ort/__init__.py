"""ONNX Runtime engine builds of a bundle's graphs: one module per pass, :mod:`engines.ort.pipelines` for
which passes each engine kind runs. :mod:`engines.ort_optimize` is the public face."""
