"""visikv: an exact inference engine and research toolkit for KV-cache compression.

    import visikv
    model = visikv.Model.load("default")          # or a .gguf file / Hugging Face directory
    ids = model.tokenize("The capital of France")
    logits = model.logits(ids)                    # numpy float32 [tokens, vocab]
    for token in model.generate("Once upon a time", 32, temperature=0.8, seed=1):
        print(token.text, end="", flush=True)

Cache codecs (``keys=``, ``values=``) and attention selectors (``selector=``) take the same specs
as the command line (docs/CACHE_SPECS.md, docs/SELECTOR_SPECS.md). Errors raise visikv.Error.
"""

from ._visikv import Error, Generation, Model, Token, kernels, set_threads, threads

__all__ = ["Error", "Generation", "Model", "Token", "kernels", "set_threads", "threads"]
