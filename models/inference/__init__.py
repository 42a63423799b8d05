"""SNLP over the model: a sequential prefix and a layer-parallel tail solved by layersolve (`snlp.Plan`,
`snlp.forward`), and KV-cache decoding with the same plans (`decode.generate`)."""
